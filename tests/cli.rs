//! End-to-end tests of the `granary` binary: real processes, real files.

use std::path::Path;
use std::process::{Command, Output};

use granary_core::pack::PackWriter;
use granary_core::ChunkId;

fn granary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run granary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_command_and_version_works() {
    let o = granary(&["--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    for cmd in [
        "server",
        "upload",
        "download",
        "datasets",
        "log",
        "ls",
        "diff",
        "rm",
        "mount",
        "umount",
        "prefetch",
        "cache-stats",
        "admin",
        "inspect",
        "bench",
    ] {
        assert!(help.contains(&format!("  {cmd} ")), "--help lacks {cmd}:\n{help}");
    }
    let o = granary(&["--version"]);
    assert!(o.status.success());
    assert_eq!(
        stdout(&o).trim(),
        format!("granary {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn inspect_tree_is_deterministic_and_scriptable() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::fs::write(d.path().join("sub/a.txt"), b"alpha").unwrap();
    std::fs::write(d.path().join("b.bin"), vec![7u8; 300_000]).unwrap();
    let dir = d.path().to_str().unwrap();
    let first = granary(&["inspect", "tree", dir, "--json"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let v: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(v["files"], 2);
    assert_eq!(v["dirs"], 1);
    assert_eq!(v["bytes"], 300_005);
    assert_eq!(v["root"].as_str().unwrap().len(), 64);
    let second = granary(&["inspect", "tree", dir, "--json"]);
    assert_eq!(stdout(&first), stdout(&second));

    let text = granary(&["inspect", "tree", dir]);
    assert!(stdout(&text).contains(v["root"].as_str().unwrap()));
}

#[test]
fn errors_are_one_line_with_nonzero_exit() {
    let o = granary(&["inspect", "tree", "/definitely/not/here"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(
        err.trim_end(),
        "error: cannot read '/definitely/not/here': No such file or directory (os error 2)",
        "the whole line, its cause once"
    );

    // Local mistakes are reported before any server is contacted.
    let o = granary(&["upload", "/definitely/not/here", "ds", "--server", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("error: cannot read '/definitely/not/here'"),
        "{}",
        stderr(&o)
    );
    let o = granary(&["upload", "/tmp", "bad/name", "--server", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("error: invalid dataset name \"bad/name\""),
        "{}",
        stderr(&o)
    );
    // And an unreachable server is named, with the fix.
    let o = granary(&["datasets", "--server", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot reach a granary server at 127.0.0.1:1"),
        "{}",
        stderr(&o)
    );
}

fn write_pack(path: &Path) {
    let mut w = PackWriter::create(path, 42).unwrap();
    for i in 0..10u32 {
        let data = format!("chunk number {i} ").repeat(100 + i as usize);
        w.append_chunk(&ChunkId::of(data.as_bytes()), data.as_bytes())
            .unwrap();
    }
    w.seal().unwrap();
}

#[test]
fn inspect_pack_lists_verifies_and_reports_damage() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("42.pack");
    write_pack(&path);
    let p = path.to_str().unwrap();
    let o = granary(&["inspect", "pack", p, "--verify", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pack_id"], 42);
    assert_eq!(v["chunks"], 10);
    assert_eq!(v["bad"].as_array().unwrap().len(), 0);

    // Flip a byte inside the first frame's payload: the index stays valid, the frame does not.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[24 + 48 + 5] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let o = granary(&["inspect", "pack", p, "--verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("verified   9 ok, 1 damaged"),
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("1 of 10 frames"), "{}", stderr(&o));

    // Damage the footer: the pack is refused outright.
    let len = bytes.len();
    bytes[len - 1] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let o = granary(&["inspect", "pack", p]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("damaged footer"), "{}", stderr(&o));
}
