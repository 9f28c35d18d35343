//! The daemon's command line and start-up failures, as a user meets them.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use vhost_user_tap_guest::kit::*;

/// The daemon run to completion (it must end within [`WAIT`]).
fn daemon(args: &[&str]) -> std::process::Output {
    output_within(Command::new(daemon_bin()).args(args), WAIT)
}

/// The daemon in `ns` run to completion (it must end within [`WAIT`]).
fn in_ns(ns: &Netns, args: &[&str]) -> std::process::Output {
    output_within(
        ns.command(daemon_bin()).args(args).env("RUST_LOG", "info"),
        WAIT,
    )
}

#[test]
fn print_capabilities_prints_the_vhost_user_json() {
    let out = daemon(&["--print-capabilities"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"type": "net"}"#
    );
}

#[test]
fn bad_arguments_give_one_line_naming_them_and_status_2() {
    for (args, needle) in [
        (vec!["--bogus"], "--bogus"),
        (vec!["--tap", "vut0"], "--socket-path or --fd"),
        (vec!["--socket-path", "/tmp/x"], "--tap"),
        (
            vec!["--socket-path", "/tmp/x", "--tap", "vut0", "--mtu", "12"],
            "--mtu 12",
        ),
        (
            vec![
                "--socket-path",
                "/tmp/x",
                "--tap",
                "vut0",
                "--queue-size",
                "3",
            ],
            "--queue-size 3",
        ),
        (
            vec!["--socket-path", "/tmp/x", "--tap", "vut0", "--mac", "zz"],
            "--mac \"zz\"",
        ),
        (
            vec!["--socket-path", "/tmp/x", "--tap", "bad/name"],
            "bad/name",
        ),
        (
            vec!["--socket-path", "/tmp/x", "--fd", "3", "--tap", "t"],
            "--fd",
        ),
        (
            vec!["--socket-path", "/tmp/x", "--tap", "t", "--mtu", "many"],
            "--mtu",
        ),
        (
            vec![
                "--socket-path",
                "/tmp/x",
                "--tap",
                "t",
                "--socket-group",
                "no-such-vut",
            ],
            "--socket-group \"no-such-vut\": no such group",
        ),
    ] {
        let out = daemon(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: more than one line: {err}"
        );
        assert!(
            err.contains(needle),
            "{args:?}: {err:?} does not name {needle:?}"
        );
    }
}

#[test]
fn tap_failures_name_the_tap_and_the_cause() {
    if !root_or_skip("tapfail") {
        return;
    }
    let ns = Netns::new("tapfail");
    let dir = TempDir::new("tapfail");
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();

    // Not a tap: a tun device of the same name.
    ns.ip(&["tuntap", "add", "tun7", "mode", "tun"]);
    let out = in_ns(&ns, &["--socket-path", sock, "--tap", "tun7"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tun7") && err.contains("cannot be attached as a tap"),
        "{err}"
    );

    // Busy: a single-queue tap another daemon holds.
    let _holder = Daemon::start(&ns, "busy0", &[]);
    let out = in_ns(&ns, &["--socket-path", sock, "--tap", "busy0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("busy0") && err.contains("busy"), "{err}");

    // No permission: an unprivileged user and a tap owned by someone else (a tap with no owner
    // is open to anyone who can open /dev/net/tun).
    ns.add_tap("root0", &["user", "root", "vnet_hdr"]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = output_within(
        ns.unprivileged("", daemon_bin())
            .args(["--socket-path", sock, "--tap", "root0"]),
        WAIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("root0") && err.contains("no permission"),
        "{err}"
    );
    assert!(
        err.contains("ip tuntap add root0 mode tap user"),
        "says how to fix it: {err}"
    );
}

#[test]
fn an_unprivileged_daemon_serves_a_tap_created_for_its_user() {
    if !root_or_skip("unpriv") {
        return;
    }
    let ns = Netns::new("unpriv");
    ns.add_tap(TAP, &["user", "nobody", "vnet_hdr"]);
    let dir = TempDir::new("unpriv");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.path().join("s.sock");
    let mut cmd = ns.unprivileged("", daemon_bin());
    cmd.args(["--tap", TAP, "--socket-path"]).arg(&sock);
    let mut d = Daemon::spawn(&mut cmd, sock.clone(), "listening on");
    ns.configure_tap(TAP);
    let mut g = d.connect(guest_config(&sock));
    let host = ns.udp_socket(&format!("{HOST_IP}:0"));
    host_to_guest(&host, &mut g, 0..20);
    drop(g);
    let c = d.counters_when_idle(0);
    d.terminate_ok();
    assert_eq!(c["rx_frames"], 20, "{c:?}");
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn backpressure_mode_follows_the_kernel_and_says_why() {
    if !root_or_skip("bpmode") {
        return;
    }
    let kernel_has = vhost_user_tap::tap::tun_features().unwrap()
        & vhost_user_tap::tap::IFF_BACKPRESSURE as u32
        != 0;
    let ns = Netns::new("bpmode");
    let dir = TempDir::new("bpmode");
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let mut auto = Daemon::start(&ns, "bp0", &["--backpressure", "auto"]);
    let expect = if kernel_has {
        "backpressure on: tap bp0 has IFF_BACKPRESSURE"
    } else {
        "backpressure off (stock mode): this kernel's tun lacks IFF_BACKPRESSURE"
    };
    assert!(auto.log().contains(expect), "{}", auto.log());
    assert!(auto.terminate().success());

    if kernel_has {
        let mut on = Daemon::start(&ns, "bp1", &["--backpressure", "on"]);
        assert!(
            on.log().contains("backpressure on: tap bp1"),
            "{}",
            on.log()
        );
        assert!(on.terminate().success());
    } else {
        let args = [
            "--socket-path",
            sock,
            "--tap",
            "bp1",
            "--backpressure",
            "on",
        ];
        let out = in_ns(&ns, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--backpressure on: this kernel's tun has no IFF_BACKPRESSURE"),
            "{err}"
        );
    }
}

/// Whether user nobody, with `group` as its only group, can connect to the unix socket `path`.
fn nobody_can_connect(path: &std::path::Path, group: &str) -> bool {
    let out = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            &format!("--regid={group}"),
            "--clear-groups",
        ])
        .args(["/usr/bin/python3", "-c"])
        .arg("import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])")
        .arg(path)
        .output()
        .expect("setpriv and python3 (Debian packages util-linux, python3)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || err.contains("PermissionError"),
        "connecting failed for another reason: {err}"
    );
    out.status.success()
}

#[test]
fn socket_group_lets_that_group_connect_after_every_start() {
    use std::os::unix::fs::MetadataExt;
    if !root_or_skip("sockgroup") {
        return;
    }
    let ns = Netns::new("sockgroup");
    // nogroup stands in for libvirt-qemu's group; `users` for everyone else.
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("group nogroup");
    for start in 0..2 {
        let mut d = Daemon::start(&ns, TAP, &["--socket-group", "nogroup"]);
        let meta = std::fs::metadata(&d.socket).unwrap();
        assert_eq!(meta.gid(), nogroup.gid.as_raw(), "start {start}");
        assert_eq!(meta.mode() & 0o777, 0o660, "start {start}");
        assert!(nobody_can_connect(&d.socket, "nogroup"), "start {start}");
        assert!(!nobody_can_connect(&d.socket, "users"), "start {start}");
        assert!(d.terminate().success(), "{}", d.log());
    }
    // Without the option the socket keeps the daemon's group and the umask's mode: a frontend
    // in another group is refused (what libvirt users met).
    let mut d = Daemon::start(&ns, TAP, &[]);
    assert!(!nobody_can_connect(&d.socket, "nogroup"));
    assert!(d.terminate().success(), "{}", d.log());
}
