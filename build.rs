//! The release binary's functions in the order of `src/link-order.txt` (`benches/layout.sh`
//! writes it): the ones the proxy and its emulator run, side by side at the front of the code.
//!
//! A process's code is resident by the page, and Linux maps a cached file's pages 64 KiB at a
//! time around each one touched (fault-around). Spread over the whole binary, the few thousand
//! functions a proxy runs kept most of its code resident in every process that maps it; linked
//! together, they take a few windows (README, "Memory").
//!
//! Only where the linker is known to be LLD, which takes `--symbol-ordering-file`: rustc's own
//! `rust-lld`, the default for `x86_64-unknown-linux-gnu` since Rust 1.90, in release builds, and
//! not when the flags choose a linker of their own. `IMPERSONATE_LINK_LAYOUT=0` turns it off
//! (and the packed relocations below). A name in the list that the binary lacks is skipped
//! without a word; the build is the same either way but for where each function lies.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=src/link-order.txt");
    println!("cargo:rerun-if-env-changed=IMPERSONATE_LINK_LAYOUT");
    let var = |k: &str| env::var(k).unwrap_or_default();
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    let own_linker =
        flags.contains("linker") || flags.contains("fuse-ld") || !var("RUSTC_LINKER").is_empty();
    if var("TARGET") != "x86_64-unknown-linux-gnu"
        || var("PROFILE") != "release"
        || own_linker
        || var("IMPERSONATE_LINK_LAYOUT") == "0"
    {
        return;
    }
    // Relative relocations packed (DT_RELR) rather than 24 bytes each: ld.so reads all of
    // them at start-up, 350 KB of the binary resident in every process for 14,000 pointers.
    // glibc reads DT_RELR from 2.36 on, and LLD marks the binary as needing it, so only a
    // build against such a glibc (this is no cross build) packs them.
    if var("HOST") == var("TARGET") && glibc_reads_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("src/link-order.txt");
    if !order.is_file() {
        return;
    }
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// Whether this machine's glibc (`getconf GNU_LIBC_VERSION`: "glibc 2.36") is 2.36 or later.
fn glibc_reads_relr() -> bool {
    let Ok(out) = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 36)
}
