//! The duration parser of the config (`90s`, `1h30m`, `250ms`, bare seconds): what it accepts
//! reads back the same from the form the proxy prints, and an error never repeats the text.
#![no_main]

use impersonate_proxy::config::{parse_duration, show};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(d) = parse_duration(s) {
        // `show` prints milliseconds at most; past u64 milliseconds it cannot be read back,
        // and no bound in the config comes near.
        if d.as_millis() <= u128::from(u64::MAX) {
            let shown = show(d);
            assert_eq!(parse_duration(&shown), Ok(d), "{s:?} shown as {shown}");
        }
    }
    // The same text with a secret-looking word inside is refused without being repeated.
    let mut at = s.len() / 2;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    let marked = format!("{}ya29.FUZZSECRET{}", &s[..at], &s[at..]);
    match parse_duration(&marked) {
        Ok(d) => panic!("{marked:?} accepted as {d:?}"),
        Err(e) => assert!(!e.contains("FUZZSECRET"), "{marked:?}: {e}"),
    }
});
