//! vhost-user-tap: a vhost-user network backend between a Linux tap and a guest's virtio-net rings.
pub mod guest;
