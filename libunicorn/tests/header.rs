//! `include/unicorn.h` is generated from the Rust source by cbindgen and committed. This test
//! regenerates it and fails when the committed copy differs; `UNICORN_BLESS=1` rewrites it.

use std::path::PathBuf;

#[test]
fn committed_header_is_current() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("../include/unicorn.h");
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .with_after_include(format!(
            "\n/* The version of libunicorn this header belongs to. */\n#define UNICORN_VERSION \"{}\"",
            env!("CARGO_PKG_VERSION")
        ))
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut fresh);
    let fresh = status_names(&String::from_utf8(fresh).expect("UTF-8 header"));
    if std::env::var_os("UNICORN_BLESS").is_some() {
        std::fs::write(&header, &fresh).expect("writing include/unicorn.h");
        return;
    }
    let committed = std::fs::read_to_string(&header).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/unicorn.h is stale: regenerate it with `UNICORN_BLESS=1 cargo test -p libunicorn --test header` and commit it"
    );
}

/// cbindgen names enum members `<ENUM>_<VARIANT>`; the status enum's members are spelled
/// `UNICORN_OK` and `UNICORN_ERR_<VARIANT>` instead, the names C programs test against.
fn status_names(header: &str) -> String {
    header.replace("UNICORN_STATUS_OK", "UNICORN_OK").replace("UNICORN_STATUS_", "UNICORN_ERR_")
}
