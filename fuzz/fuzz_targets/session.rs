#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vhost_user_tap_fuzz::session(data));
