//! The one YAML reader for our files (the config and the emulator's policy), bounded so that a
//! small hostile file cannot make the parser allocate without limit or hang, strict about keys
//! given twice, and careful that its messages locate a problem without repeating the text
//! there (a secret typed into the wrong key).

use std::path::Path;

use serde::de::DeserializeOwned;

/// Largest YAML file read (config or emulator policy): far beyond any real one, and small
/// enough that reading and parsing it is quick.
pub const MAX_YAML_BYTES: usize = 4 << 20;

/// Read a YAML file of at most [`MAX_YAML_BYTES`]; a larger one (or `/dev/zero`) is refused
/// without being read whole.
pub fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_YAML_BYTES as u64 + 1)
        .read_to_string(&mut text)?;
    if text.len() > MAX_YAML_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_YAML_BYTES >> 20),
        ));
    }
    Ok(text)
}

/// The one YAML reader for our files (config and emulator policy): input size, nesting, node
/// count and alias expansion are bounded, so a small file cannot make the parser allocate
/// without limit, and a key given twice in one mapping (an identity, a route field, a top-level
/// key) is an error instead of the last one silently winning. The message names the location
/// and what was expected, never the offending text (it may be a secret typed into the wrong
/// key).
pub fn from_str<T: DeserializeOwned>(yaml: &str) -> Result<T, String> {
    if yaml.len() > MAX_YAML_BYTES {
        return Err(format!("larger than {} MiB", MAX_YAML_BYTES >> 20));
    }
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 200_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_nodes: 100_000,
            max_depth: 32,
            max_total_scalar_bytes: MAX_YAML_BYTES,
            max_documents: 1,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
            max_replay_stack_depth: 16,
        },
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
    };
    serde_saphyr::from_str_with_options(yaml, options).map_err(|e| {
        let mut message = scrub_yaml_error(&e);
        if message.starts_with("budget breached") || message.contains("alias replay limit") {
            message = format!(
                "beyond the YAML limits (one document, depth 32, 100,000 nodes, 1,000 anchors and aliases, 100,000 events replayed from aliases): {message}"
            );
        }
        // Name the key: the parser gives the value's position; the key is found from it.
        let key = e
            .location()
            .and_then(|l| key_path(yaml, l.line(), l.column()));
        match key {
            Some(k) if !message.contains(&format!("`{k}`")) => format!("{k}: {message}"),
            _ => message,
        }
    })
}

/// The dotted path (`limits.max_connections`, `routes[2].passthrough`) of the key whose value
/// starts at 1-based `line` and `column`, from the keys and flow brackets before it on that line
/// and the block indentation above it. Only for messages: `None`, or a shorter path, when the
/// layout is unusual (quoted keys, keys spanning lines).
pub fn key_path(yaml: &str, line: u64, column: u64) -> Option<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let at = usize::try_from(line).ok()?.checked_sub(1)?;
    let text = *lines.get(at)?;
    let upto: String = text
        .chars()
        .take(usize::try_from(column).ok()?.saturating_sub(1))
        .collect();
    let mut path = flow_path(&upto);
    if path.is_empty() {
        return None;
    }
    // Then up through the block structure: each line indented less than the current one and
    // ending in `key:` is a parent; `- ` items are counted to give sequence indices.
    let (mut indent, mut item) = shape(text);
    let mut index = 0usize;
    for above in lines[..at].iter().rev() {
        let trimmed = above.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (lead, is_item) = shape(above);
        if item {
            if lead == indent && is_item {
                index += 1;
                continue;
            }
            if lead > indent {
                continue;
            }
            // The key that holds this sequence (it may sit at the same indentation).
            let Some(key) = plain_key(above) else { break };
            path.insert(0, format!("{key}[{index}]"));
            (indent, item, index) = (lead, is_item, 0);
        } else if lead < indent {
            if is_item && lead + 2 == indent {
                // A sibling key on the item's first line (`- host: a`): same mapping.
                (indent, item, index) = (lead, true, 0);
                continue;
            }
            let Some(key) = plain_key(above) else { break };
            path.insert(0, key);
            (indent, item, index) = (lead, is_item, 0);
        }
        if indent == 0 && !item {
            break;
        }
    }
    Some(path.join("."))
}

/// A plain key, or a quoted one of the same characters plus `:` (`"host:443"`): anything else
/// before a `: ` is left out of messages rather than risk printing part of a value.
fn is_key_like(w: &str) -> bool {
    let plain = |s: &str, extra: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c) || extra.contains(c))
    };
    let quoted = ['"', '\''].iter().any(|q| {
        w.len() >= 2 && w.starts_with(*q) && w.ends_with(*q) && plain(&w[1..w.len() - 1], ":")
    });
    plain(w, "") || quoted
}

/// Indentation, and whether the line is a sequence item (`- …`).
fn shape(line: &str) -> (usize, bool) {
    let lead = line.len() - line.trim_start_matches(' ').len();
    (lead, line[lead..].starts_with("- ") || &line[lead..] == "-")
}

/// The key of a `key:` or `- key:` line, if it is a plain word.
fn plain_key(line: &str) -> Option<String> {
    let rest = line.trim_start();
    let rest = rest.strip_prefix("- ").unwrap_or(rest).trim_start();
    let (key, _) = rest.split_once(':')?;
    let key = key.trim();
    is_key_like(key).then(|| key.to_string())
}

/// The keys open at the end of `prefix` (part of one line): `a: { b: [ { c: ` gives
/// `a.b[0].c`, counting flow sequence entries.
fn flow_path(prefix: &str) -> Vec<String> {
    // One frame per open flow collection: its key, and for a sequence the entry index.
    let mut frames: Vec<(Option<String>, Option<usize>)> = Vec::new();
    let mut current: Option<String> = None;
    let mut word = String::new();
    let mut chars = prefix.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // A quoted scalar is one word, whatever brackets or colons it holds.
            '"' | '\'' => {
                word.push(c);
                let mut escaped = false;
                for q in chars.by_ref() {
                    word.push(q);
                    if q == c && !escaped {
                        break;
                    }
                    escaped = c == '"' && q == '\\' && !escaped;
                }
            }
            ':' if chars.peek().is_none_or(|n| *n == ' ') => {
                let w = word.trim().trim_start_matches("- ").trim();
                current = is_key_like(w).then(|| w.to_string());
                word.clear();
            }
            '{' | '[' => {
                frames.push((current.take(), (c == '[').then_some(0)));
                word.clear();
            }
            '}' | ']' => {
                frames.pop();
                current = None;
                word.clear();
            }
            ',' => {
                if let Some((_, Some(i))) = frames.last_mut() {
                    *i += 1;
                }
                current = None;
                word.clear();
            }
            _ => word.push(c),
        }
    }
    let mut path: Vec<String> = Vec::new();
    for (key, index) in frames {
        match (key, index) {
            (Some(k), Some(i)) => path.push(format!("{k}[{i}]")),
            (Some(k), None) => path.push(k),
            (None, Some(i)) => match path.last_mut() {
                Some(last) => last.push_str(&format!("[{i}]")),
                None => path.push(format!("[{i}]")),
            },
            (None, None) => {}
        }
    }
    if let Some(k) = current {
        path.push(k);
    }
    path
}

/// The parser's plain message (no source snippet: it would print the line), with quoted values
/// removed from serde's "invalid type/value" and "unknown variant" phrasings.
fn scrub_yaml_error(e: &serde_saphyr::Error) -> String {
    let msg = e
        .without_snippet()
        .to_string()
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg.as_str();
    loop {
        // `string "…"` (invalid type/value) and "unknown variant `…`" carry the value.
        let quoted = [("string \"", '"'), ("variant `", '`')]
            .iter()
            .filter_map(|(open, close)| rest.find(open).map(|i| (i, *open, *close)))
            .min_by_key(|(i, _, _)| *i);
        let Some((i, open, close)) = quoted else {
            out.push_str(rest);
            return out;
        };
        let after = i + open.len();
        out.push_str(&rest[..i]);
        out.push_str(open.trim_end_matches(['"', '`']).trim_end());
        match rest[after..].find(close) {
            Some(j) => rest = &rest[after + j + 1..],
            None => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of(yaml: &str, needle: &str) -> Option<String> {
        let (line, text) = yaml
            .lines()
            .enumerate()
            .find(|(_, l)| l.contains(needle))
            .unwrap();
        let column = text[..text.find(needle).unwrap()].chars().count() + 1;
        key_path(yaml, line as u64 + 1, column as u64)
    }

    #[test]
    fn key_paths_in_block_and_flow_style() {
        for (yaml, path) in [
            ("listen: BAD\n", "listen"),
            ("limits: { max_connections: BAD }\n", "limits.max_connections"),
            ("tokens:\n  jitter: 1s\n  refresh_margin: BAD\n", "tokens.refresh_margin"),
            ("identities:\n  a:\n    service_account: x\n    lifetime: BAD\n", "identities.a.lifetime"),
            (
                "routes:\n  - { host: a, passthrough: true }\n  - { host: b, passthrough: BAD }\n",
                "routes[1].passthrough",
            ),
            (
                "routes:\n- host: a\n  passthrough: true\n- host: b\n  # note\n  passthrough: BAD\n",
                "routes[1].passthrough",
            ),
            ("allowed_ports: [443, BAD]\n", "allowed_ports[1]"),
            ("upstream:\n  resolve: { \"a:443\": BAD }\n", "upstream.resolve.\"a:443\""),
            // Brackets, colons and commas inside an earlier quoted value are not structure.
            ("x: { a: \"{ s3cret: [\", b: BAD }\n", "x.b"),
            ("x: { a: 'it''s: {', b: BAD }\n", "x.b"),
        ] {
            assert_eq!(path_of(yaml, "BAD").as_deref(), Some(path), "{yaml}");
        }
    }

    #[test]
    fn input_size_is_bounded_before_parsing() {
        let big = "#".repeat(MAX_YAML_BYTES + 1);
        assert!(from_str::<serde::de::IgnoredAny>(&big)
            .unwrap_err()
            .contains("larger than"));
    }
}
