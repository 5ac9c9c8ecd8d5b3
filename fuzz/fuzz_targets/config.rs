//! Config loading: YAML text → `Config::from_yaml` (the bounded reader, serde, `validate()`
//! with its bounds and cross-field rules). A config that loads also compiles (routes, clients,
//! each quota project as a header value), and an error never repeats a value: a `$S` ending a
//! `key: $S` line outside flow collections becomes a secret-looking token that no message may
//! contain.
#![no_main]

use impersonate_proxy::clients::ClientTable;
use impersonate_proxy::config::Config;
use impersonate_proxy::routes::RouteTable;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "ya29.FUZZSECRET";

fuzz_target!(|text: &str| {
    let (yaml, marked) = mark_values(text);
    match Config::from_yaml(&yaml, "fuzz.yaml") {
        Ok(config) => {
            let table = RouteTable::compile(&config)
                .unwrap_or_else(|e| panic!("validated, yet the routes do not compile: {e}"));
            let _ = ClientTable::compile(&config, table.len());
            for (name, id) in &config.identities {
                if let Some(q) = &id.quota_project {
                    assert!(
                        http::HeaderValue::from_str(q).is_ok(),
                        "identities.{name}.quota_project validated, yet not a header value"
                    );
                }
            }
        }
        Err(e) => {
            let e = e.to_string();
            assert!(!marked || !e.contains("FUZZSECRET"), "{yaml}\n→ {e}");
        }
    }
});

/// `$S` ending a line after `: ` is a value (of a mapping, or part of a quoted or block
/// scalar, or a comment) when no flow collection is open: inside `{ }` or `[ ]` a plain
/// scalar may run on over lines and end as a key, and keys are named in messages. So marking
/// stops at the first line that leaves a bracket open or closes one it did not open, and at
/// the first line with a bracket and a quote: a quoted bracket must not balance a real one
/// (`{ "a }` leaves the flow mapping open, and the quoted key runs on over the next lines).
/// Those `$S` become [`SECRET`].
fn mark_values(text: &str) -> (String, bool) {
    let mut marked = false;
    let mut flow = false;
    let lines: Vec<String> = text
        .split('\n')
        .map(|line| {
            let mut depth = 0i32;
            for c in line.chars() {
                match c {
                    '{' | '[' => depth += 1,
                    '}' | ']' => depth -= 1,
                    _ => {}
                }
                flow |= depth < 0;
            }
            flow |= depth != 0;
            let bracket = line.contains(['{', '}', '[', ']']);
            flow |= bracket && line.contains(['"', '\'']);
            match line.strip_suffix(": $S") {
                Some(before) if !flow => {
                    marked = true;
                    format!("{before}: {SECRET}")
                }
                _ => line.to_string(),
            }
        })
        .collect();
    (lines.join("\n"), marked)
}
