//! The operator's CLI (OPERATIONS.md), run as the real binary against a temporary data
//! directory.

use std::path::Path;
use std::process::{Command, Output};

fn remixd(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(args)
        .current_dir(dir)
        .env("REMIXD__DATA_DIR", dir.join("data"))
        .output()
        .expect("run remixd")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = remixd(dir, args);
    assert!(
        out.status.success(),
        "remixd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = remixd(dir, args);
    assert!(!out.status.success(), "remixd {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one clear line on stderr: {err}"
    );
    err
}

#[test]
fn accounts_keys_and_credits() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    assert!(ok(dir, &["migrate"]).contains("migrations applied"));
    let id = ok(dir, &["accounts", "create", "acme", "--credits", "50"]);
    assert_eq!(id.trim().len(), 32);
    assert!(fails(dir, &["accounts", "create", "acme"]).contains("already exists"));
    assert_eq!(
        ok(dir, &["credits", "add", "--account", "acme", "25"]).trim(),
        "75"
    );
    assert_eq!(
        ok(dir, &["credits", "add", "--account", "acme", "-5"]).trim(),
        "70"
    );
    assert!(fails(dir, &["credits", "add", "--account", "acme", "-500"]).starts_with("error:"));
    assert!(fails(dir, &["credits", "add", "--account", "nobody", "5"]).contains("not found"));
    let list = ok(dir, &["accounts", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains("acme") && l.trim_end().ends_with("70")),
        "{list}"
    );

    let out = ok(
        dir,
        &[
            "keys",
            "create",
            "--account",
            "acme",
            "--label",
            "ci",
            "--hourly-limit",
            "100",
        ],
    );
    let key = out.lines().last().unwrap().trim().to_string();
    assert!(
        key.starts_with("rmx_") && key.len() == 4 + 16 + 1 + 64,
        "{key}"
    );
    let key_id = &key[4..20];
    let listed = ok(dir, &["keys", "list", "--account", "acme"]);
    assert!(
        listed.contains(key_id)
            && listed.contains("ci")
            && listed.contains("100")
            && listed.contains("active")
    );
    assert!(
        !listed.contains(&key[21..]),
        "keys list never prints secrets"
    );
    assert!(ok(dir, &["keys", "revoke", key_id]).contains("revoked"));
    assert!(ok(dir, &["keys", "list"]).contains("revoked"));
    assert!(fails(dir, &["keys", "revoke", key_id]).contains("no active key"));
    assert!(fails(dir, &["keys", "create", "--account", "ghost"]).contains("ghost"));
}

#[test]
fn config_show_redacts_and_unknown_keys_are_named() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    std::fs::write(
        dir.join("remixd.toml"),
        "[engine.fal]\nkey = \"fal-secret-123\"\n[server]\nlisten = \"127.0.0.1:9999\"\n",
    )
    .unwrap();
    let shown = ok(dir, &["config", "show"]);
    assert!(
        shown.contains("127.0.0.1:9999"),
        "the file in the working directory is read"
    );
    assert!(!shown.contains("fal-secret-123") && shown.contains("<redacted>"));

    let out = Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["config", "show"])
        .current_dir(dir)
        .env("REMIXD__SERVER__LISTEN", "127.0.0.1:7777")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:7777"),
        "environment overrides the file"
    );

    std::fs::write(dir.join("remixd.toml"), "[server]\nlisen = \"x\"\n").unwrap();
    let err = fails(dir, &["config", "show"]);
    assert!(err.contains("lisen"), "{err}");
    std::fs::write(
        dir.join("remixd.toml"),
        "[api]\ndisabled = [\"createTsak\"]\n",
    )
    .unwrap();
    assert!(fails(dir, &["config", "show"]).contains("createTsak"));
}

#[test]
fn demo_writes_images_and_prints_the_record() {
    let d = tempfile::tempdir().unwrap();
    let out = remixd(d.path(), &["demo", "--out", "imgs"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"state\": \"success\""), "{stdout}");
    let files: Vec<_> = std::fs::read_dir(d.path().join("imgs")).unwrap().collect();
    assert_eq!(files.len(), 2);
    for f in files {
        let img = image::open(f.unwrap().path()).unwrap();
        assert_eq!((img.width(), img.height()), (1024, 768));
    }
}

#[test]
fn webhook_secrets_and_deliveries() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    ok(dir, &["accounts", "create", "hooks", "--credits", "5"]);
    let secret = ok(dir, &["webhooks", "secret", "--account", "hooks"])
        .trim()
        .to_string();
    assert!(
        secret.starts_with("whsec_") && secret.len() == 6 + 44,
        "{secret}"
    );
    let rotated = ok(dir, &["webhooks", "secret", "--account", "hooks"])
        .trim()
        .to_string();
    assert_ne!(secret, rotated, "each call rotates the secret");
    assert!(fails(dir, &["webhooks", "secret", "--account", "ghost"]).contains("ghost"));
    let listed = ok(dir, &["deliveries", "list", "--state", "failed"]);
    assert_eq!(listed.lines().count(), 1, "only the header: {listed}");
    assert!(fails(dir, &["deliveries", "list", "--state", "lost"])
        .contains("pending, delivered or failed"));
    assert!(fails(dir, &["deliveries", "redeliver", "msg_nope"]).contains("no delivery"));
}
