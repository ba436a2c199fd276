//! Conversation rendering: special tokens, the assistant-only loss mask (SPEC 2).
//!
//! Public API (names are stable; the `prep` branch reads JSONL through it):
//!
//! - [`Conversation`], [`Message`], [`Role`], [`Content`], [`Part`], [`PartKind`]: a plain-Rust,
//!   *validated* conversation. Build one with [`Conversation::new`] (checks role order,
//!   system-then-user, non-empty), [`parse_json_conversation`] (a `serde_json::Value`: an object
//!   with `"messages"`, or a bare array of messages as CustomJSON lines allow) or
//!   [`parse_json_line`] (one JSONL line). Python objects are walked in `py/data.rs`.
//! - [`ChatTokens::from_bpe`]: the nine special ids, looked up once.
//! - [`render`]`(&CoreBPE, &Conversation, max_tokens) -> Result<(Vec<u32>, Vec<u8>)>` and
//!   [`render_into`] (appends into caller vectors, no per-call lookups) give ids and mask.
//! - [`render_for_completion`]: drops the final assistant message, appends `<|assistant_start|>`.
//!
//! Every error is `Error::Conversation { location, message, reason }`: `location` is what the
//! caller passed ("conversation 12", "file.jsonl:34"), `message` the index of the offending
//! message in the original list (system message included) or "-" when the whole record is wrong.
//!
//! Mask (SPEC 2 table, nanochat's `render_conversation`): bos 0; user_start, user text,
//! user_end 0; assistant_start 0; assistant text 1; python_start, code, python_end 1;
//! output_start, output, output_end 0; assistant_end 1. Text is encoded with ordinary encoding
//! (typing `<|bos|>` gives its bytes). A leading system message is merged into the first user
//! message as `system + "\n\n" + user` (encoded as one string, exactly as nanochat does).
//! The result is truncated to `max_tokens`.
//!
//! Performance notes:
//! - Rendering stops encoding as soon as `max_tokens` ids exist: the tail would be cut anyway,
//!   so long conversations cost only what is kept (same output as render-then-truncate).
//! - Text goes straight into the output vector through `CoreBPE::encode_ordinary_into`; the mask
//!   is extended by the number of ids appended, so there are no per-message temporaries.

use crate::bpe::{CoreBPE, Rank};
use crate::error::{Error, Result};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Text,
    Python,
    PythonOutput,
}

impl PartKind {
    pub fn parse(s: &str) -> Option<PartKind> {
        match s {
            "text" => Some(PartKind::Text),
            "python" => Some(PartKind::Python),
            "python_output" => Some(PartKind::PythonOutput),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub kind: PartKind,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Text(String),
    /// Only assistant messages may have parts.
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: Content,
}

/// A validated conversation: optional leading system message, then user, assistant, user, ...
/// (it may end on either role). Fields are private so every value has passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    messages: Vec<Message>,
}

/// A malformed conversation: where it is, which message, why (both input paths use this).
pub fn conv_err(location: &str, message: impl ToString, reason: impl Into<String>) -> Error {
    Error::Conversation {
        location: location.to_string(),
        message: message.to_string(),
        reason: reason.into(),
    }
}

/// Message `i`'s content has the wrong type (`got` names it as the input's language does).
pub fn wrong_content_type(location: &str, i: usize, role: Role, got: &str) -> Error {
    let want = if role == Role::Assistant {
        "a string or a list of parts"
    } else {
        "a string"
    };
    conv_err(
        location,
        i,
        format!("{} content must be {want}, got {got}", role.name()),
    )
}

impl Conversation {
    /// Validates role order and content kinds; `location` names the record in errors.
    pub fn new(messages: Vec<Message>, location: &str) -> Result<Self> {
        if messages.is_empty() {
            return Err(conv_err(location, "-", "conversation has no messages"));
        }
        let offset = usize::from(messages[0].role == Role::System);
        if offset == 1 {
            match messages.get(1) {
                None => {
                    return Err(conv_err(
                        location,
                        0,
                        "system message is not followed by a user message (conversation ends)",
                    ))
                }
                Some(m) if m.role != Role::User => {
                    return Err(conv_err(
                        location,
                        1,
                        format!(
                            "system message must be followed by a user message, got {}",
                            m.role.name()
                        ),
                    ))
                }
                _ => {}
            }
        }
        for (i, m) in messages.iter().enumerate().skip(offset) {
            let expected = if (i - offset) % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if m.role != expected {
                return Err(conv_err(
                    location,
                    i,
                    format!(
                        "expected role {} (messages alternate user, assistant, ...), got {}",
                        expected.name(),
                        m.role.name()
                    ),
                ));
            }
        }
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                if let Content::Parts(_) = m.content {
                    return Err(conv_err(
                        location,
                        i,
                        format!(
                            "{} content must be a string, got a list of parts",
                            m.role.name()
                        ),
                    ));
                }
            }
        }
        Ok(Self { messages })
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn into_messages(self) -> Vec<Message> {
        self.messages
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// A conversation from JSON: `{"messages": [...], ...}` (extra fields ignored) or a bare array
/// of messages (CustomJSON's other line shape).
pub fn parse_json_conversation(value: &Value, location: &str) -> Result<Conversation> {
    let messages = match value {
        Value::Object(obj) => match obj.get("messages") {
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(conv_err(
                    location,
                    "-",
                    format!("\"messages\" must be a list, got {}", type_name(other)),
                ))
            }
            None => return Err(conv_err(location, "-", "missing field \"messages\"")),
        },
        Value::Array(a) => a,
        other => {
            return Err(conv_err(
                location,
                "-",
                format!(
                "a conversation must be an object with \"messages\" or a list of messages, got {}",
                type_name(other)
            ),
            ))
        }
    };
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let obj = match m {
            Value::Object(o) => o,
            other => {
                return Err(conv_err(
                    location,
                    i,
                    format!("a message must be an object, got {}", type_name(other)),
                ))
            }
        };
        let role = match obj.get("role") {
            Some(Value::String(s)) => Role::parse(s)
                .ok_or_else(|| conv_err(location, i, format!("unknown role {s:?}")))?,
            Some(other) => {
                return Err(conv_err(
                    location,
                    i,
                    format!("\"role\" must be a string, got {}", type_name(other)),
                ))
            }
            None => return Err(conv_err(location, i, "missing field \"role\"")),
        };
        let content = match obj.get("content") {
            Some(Value::String(s)) => Content::Text(s.clone()),
            Some(Value::Array(parts)) if role == Role::Assistant => {
                let mut ps = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    let po = match p {
                        Value::Object(o) => o,
                        other => {
                            return Err(conv_err(
                                location,
                                i,
                                format!("part {j} must be an object, got {}", type_name(other)),
                            ))
                        }
                    };
                    let kind = match po.get("type") {
                        Some(Value::String(s)) => PartKind::parse(s).ok_or_else(|| {
                            conv_err(location, i, format!("part {j}: unknown part type {s:?} (expected text, python or python_output)"))
                        })?,
                        Some(other) => return Err(conv_err(location, i, format!("part {j}: \"type\" must be a string, got {}", type_name(other)))),
                        None => return Err(conv_err(location, i, format!("part {j}: missing field \"type\""))),
                    };
                    let text = match po.get("text") {
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => {
                            return Err(conv_err(
                                location,
                                i,
                                format!(
                                    "part {j}: \"text\" must be a string, got {}",
                                    type_name(other)
                                ),
                            ))
                        }
                        None => {
                            return Err(conv_err(
                                location,
                                i,
                                format!("part {j}: missing field \"text\""),
                            ))
                        }
                    };
                    ps.push(Part { kind, text });
                }
                Content::Parts(ps)
            }
            Some(other) => return Err(wrong_content_type(location, i, role, type_name(other))),
            None => return Err(conv_err(location, i, "missing field \"content\"")),
        };
        out.push(Message { role, content });
    }
    Conversation::new(out, location)
}

/// A JSON document as Python's `json.loads` reads it where serde_json is stricter: a lone UTF-16
/// surrogate escape (`"\ud800"`, common in scraped chat data) parses, as U+FFFD, which is what
/// the text becomes when the loader's path (json.loads, then rendering) encodes it. So `prep`
/// and the loader accept the same lines and render them to the same tokens.
pub fn parse_json(bytes: &[u8]) -> serde_json::Result<Value> {
    match serde_json::from_slice(bytes) {
        // the rewrite keeps every byte offset (6 bytes for 6), so the retry's error, if the
        // text is broken elsewhere too, points at the right line and column
        Err(_) if has_surrogate_escape(bytes) => {
            serde_json::from_slice(&replace_lone_surrogates(bytes))
        }
        other => other,
    }
}

/// The reason a record's JSON was refused: serde_json's own words, except for its nesting
/// limit, which is not a syntax error and is named as what it is.
pub fn json_error_reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("recursion limit exceeded") {
        // serde_json's fixed limit (no feature of ours raises it); Python's json goes deeper
        format!("nested deeper than 128 levels, more than the JSON reader takes ({text})")
    } else {
        format!("invalid JSON: {text}")
    }
}

/// The code unit of four hex digits at the start of `b`.
fn hex4(b: &[u8]) -> Option<u16> {
    let digits = b.get(..4)?;
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// Whether the text holds a `\uD800`-`\uDFFF` escape at all (the cheap test before rewriting).
fn has_surrogate_escape(bytes: &[u8]) -> bool {
    bytes.windows(6).any(|w| {
        w[0] == b'\\'
            && w[1] == b'u'
            && hex4(&w[2..]).is_some_and(|u| (0xD800..0xE000).contains(&u))
    })
}

/// Rewrites unpaired surrogate escapes to `\uFFFD`; pairs and every other byte stay. Backslashes
/// only occur inside strings in JSON, so escapes can be followed without tracking strings.
fn replace_lone_surrogates(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' || i + 1 >= bytes.len() {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let unit = if bytes[i + 1] == b'u' {
            hex4(&bytes[i + 2..])
        } else {
            None
        };
        let Some(u) = unit else {
            out.extend_from_slice(&bytes[i..i + 2]); // any other escape, e.g. \\ or \"
            i += 2;
            continue;
        };
        let low_follows = || {
            bytes.get(i + 6..i + 8) == Some(&b"\\u"[..])
                && hex4(&bytes[i + 8..]).is_some_and(|l| (0xDC00..0xE000).contains(&l))
        };
        if (0xD800..0xDC00).contains(&u) && low_follows() {
            out.extend_from_slice(&bytes[i..i + 12]); // a proper pair
            i += 12;
        } else if (0xD800..0xE000).contains(&u) {
            out.extend_from_slice(b"\\uFFFD");
            i += 6;
        } else {
            out.extend_from_slice(&bytes[i..i + 6]);
            i += 6;
        }
    }
    out
}

/// One JSONL line -> conversation; a JSON syntax error is reported at `location` too.
pub fn parse_json_line(line: &str, location: &str) -> Result<Conversation> {
    let value: Value =
        parse_json(line.as_bytes()).map_err(|e| conv_err(location, "-", json_error_reason(&e)))?;
    parse_json_conversation(&value, location)
}

/// The special ids rendering needs, looked up once per tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct ChatTokens {
    pub bos: Rank,
    pub user_start: Rank,
    pub user_end: Rank,
    pub assistant_start: Rank,
    pub assistant_end: Rank,
    pub python_start: Rank,
    pub python_end: Rank,
    pub output_start: Rank,
    pub output_end: Rank,
}

impl ChatTokens {
    pub fn from_bpe(bpe: &CoreBPE) -> Result<Self> {
        let id = |name: &str| {
            bpe.special_token_id(name)
                .ok_or_else(|| Error::UnknownSpecial(name.to_string()))
        };
        Ok(Self {
            bos: id("<|bos|>")?,
            user_start: id("<|user_start|>")?,
            user_end: id("<|user_end|>")?,
            assistant_start: id("<|assistant_start|>")?,
            assistant_end: id("<|assistant_end|>")?,
            python_start: id("<|python_start|>")?,
            python_end: id("<|python_end|>")?,
            output_start: id("<|output_start|>")?,
            output_end: id("<|output_end|>")?,
        })
    }
}

/// Renders `conv` and appends its ids and mask to `ids`/`mask` (which need not be empty:
/// `max_tokens` limits only what this call appends).
pub fn render_into(
    bpe: &CoreBPE,
    tokens: &ChatTokens,
    conv: &Conversation,
    max_tokens: usize,
    ids: &mut Vec<Rank>,
    mask: &mut Vec<u8>,
) {
    let start = ids.len();
    let limit = start + max_tokens;
    let push = |ids: &mut Vec<Rank>, mask: &mut Vec<u8>, id: Rank, m: u8| {
        ids.push(id);
        mask.push(m);
    };
    let text = |ids: &mut Vec<Rank>, mask: &mut Vec<u8>, s: &str, m: u8| {
        bpe.encode_ordinary_into(s, ids);
        mask.resize(ids.len(), m);
    };
    push(ids, mask, tokens.bos, 0);
    let messages = conv.messages();
    let (system, rest) = match messages[0].role {
        Role::System => (Some(&messages[0]), &messages[1..]),
        _ => (None, messages),
    };
    for (i, m) in rest.iter().enumerate() {
        if ids.len() >= limit {
            break;
        }
        match (m.role, &m.content) {
            (Role::User, Content::Text(s)) => {
                push(ids, mask, tokens.user_start, 0);
                match (i, system) {
                    (
                        0,
                        Some(Message {
                            content: Content::Text(sys),
                            ..
                        }),
                    ) => {
                        let mut merged = String::with_capacity(sys.len() + 2 + s.len());
                        merged.push_str(sys);
                        merged.push_str("\n\n");
                        merged.push_str(s);
                        text(ids, mask, &merged, 0);
                    }
                    _ => text(ids, mask, s, 0),
                }
                push(ids, mask, tokens.user_end, 0);
            }
            (Role::Assistant, content) => {
                push(ids, mask, tokens.assistant_start, 0);
                match content {
                    Content::Text(s) => text(ids, mask, s, 1),
                    Content::Parts(parts) => {
                        for p in parts {
                            if ids.len() >= limit {
                                break;
                            }
                            match p.kind {
                                PartKind::Text => text(ids, mask, &p.text, 1),
                                PartKind::Python => {
                                    push(ids, mask, tokens.python_start, 1);
                                    text(ids, mask, &p.text, 1);
                                    push(ids, mask, tokens.python_end, 1);
                                }
                                PartKind::PythonOutput => {
                                    push(ids, mask, tokens.output_start, 0);
                                    text(ids, mask, &p.text, 0);
                                    push(ids, mask, tokens.output_end, 0);
                                }
                            }
                        }
                    }
                }
                push(ids, mask, tokens.assistant_end, 1);
            }
            // Conversation::new guarantees users and systems hold text and only the first may be system.
            _ => unreachable!("validated conversation"),
        }
    }
    ids.truncate(limit);
    mask.truncate(limit);
}

/// Renders one conversation: (ids, mask), truncated to `max_tokens`.
pub fn render(
    bpe: &CoreBPE,
    conv: &Conversation,
    max_tokens: usize,
) -> Result<(Vec<Rank>, Vec<u8>)> {
    let tokens = ChatTokens::from_bpe(bpe)?;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    render_into(bpe, &tokens, conv, max_tokens, &mut ids, &mut mask);
    Ok((ids, mask))
}

/// Prompt for generation: the conversation without its final assistant message, rendered
/// (truncated to `max_tokens`, as nanochat does), then `<|assistant_start|>`.
pub fn render_for_completion(
    bpe: &CoreBPE,
    conv: &Conversation,
    max_tokens: usize,
    location: &str,
) -> Result<Vec<Rank>> {
    let tokens = ChatTokens::from_bpe(bpe)?;
    let messages = conv.messages();
    let last = messages.len() - 1;
    if messages[last].role != Role::Assistant {
        return Err(conv_err(
            location,
            last,
            "render_for_completion needs a conversation that ends with an assistant message",
        ));
    }
    let prompt = Conversation::new(messages[..last].to_vec(), location)?;
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    render_into(bpe, &tokens, &prompt, max_tokens, &mut ids, &mut mask);
    ids.push(tokens.assistant_start);
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_surrogate_escapes_parse_as_replacement_characters() {
        let v =
            parse_json(br#"{"a": "x\ud800y", "b": "\udc00", "c": "\ud83d\ude00", "d": "\\ud800"}"#)
                .unwrap();
        assert_eq!(v["a"], "x\u{FFFD}y");
        assert_eq!(v["b"], "\u{FFFD}");
        assert_eq!(v["c"], "\u{1F600}"); // a proper pair stays a pair
        assert_eq!(v["d"], "\\ud800"); // an escaped backslash, then plain text
        assert!(parse_json(br#"{"a": "\ud800"#).is_err()); // still broken JSON: still an error
                                                           // broken elsewhere too: the error is the real one, not the surrogate
        let e = parse_json(br#"{"a": "\ud800", }"#).unwrap_err().to_string();
        assert!(e.contains("trailing comma at line 1 column 17"), "{e}");
    }
    use crate::bpe::SPECIAL_TOKENS;
    use crate::pretokenize::NANOCHAT_PATTERN;
    use rustc_hash::FxHashMap;

    /// Byte-level vocabulary (ids 0..256 = bytes) plus the nine specials at 256..265.
    fn bpe() -> CoreBPE {
        let ranks: FxHashMap<Vec<u8>, Rank> = (0u32..256).map(|b| (vec![b as u8], b)).collect();
        let specials = SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), 256 + i as Rank))
            .collect();
        CoreBPE::new(ranks, NANOCHAT_PATTERN, specials).unwrap()
    }

    const BOS: Rank = 256;
    const US: Rank = 257;
    const UE: Rank = 258;
    const AS: Rank = 259;
    const AE: Rank = 260;
    const PS: Rank = 261;
    const PE: Rank = 262;
    const OS: Rank = 263;
    const OE: Rank = 264;

    fn bytes(s: &str) -> Vec<Rank> {
        s.bytes().map(|b| b as Rank).collect()
    }

    fn parse(s: &str) -> Result<Conversation> {
        parse_json_line(s, "test.jsonl:1")
    }

    #[test]
    fn seed_example_tool_use() {
        let conv = parse(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "python", "text": "1/5"}, {"type": "python_output", "text": "0.2"}, {"type": "text", "text": "ok"}]}]}"#,
        )
        .unwrap();
        let (ids, mask) = render(&bpe(), &conv, 2048).unwrap();
        let mut want_ids = vec![BOS, US];
        let mut want_mask = vec![0, 0];
        want_ids.extend(bytes("hi"));
        want_mask.extend([0, 0]);
        want_ids.extend([UE, AS, PS]);
        want_mask.extend([0, 0, 1]);
        want_ids.extend(bytes("1/5"));
        want_mask.extend([1, 1, 1]);
        want_ids.extend([PE, OS]);
        want_mask.extend([1, 0]);
        want_ids.extend(bytes("0.2"));
        want_mask.extend([0, 0, 0]);
        want_ids.push(OE);
        want_mask.push(0);
        want_ids.extend(bytes("ok"));
        want_mask.extend([1, 1]);
        want_ids.push(AE);
        want_mask.push(1);
        assert_eq!(ids, want_ids);
        assert_eq!(mask, want_mask);
    }

    #[test]
    fn system_merged_and_special_text_is_ordinary() {
        let conv = parse(
            r#"[{"role": "system", "content": "S"}, {"role": "user", "content": "<|bos|>"}, {"role": "assistant", "content": "A"}]"#,
        )
        .unwrap();
        let (ids, mask) = render(&bpe(), &conv, 2048).unwrap();
        let mut want = vec![BOS, US];
        want.extend(bytes("S\n\n<|bos|>"));
        want.extend([UE, AS, b'A' as Rank, AE]);
        assert_eq!(ids, want);
        assert_eq!(mask.iter().filter(|&&m| m == 1).count(), 2);
        assert!(!ids[2..ids.len() - 4].contains(&BOS));
    }

    #[test]
    fn truncation_matches_render_then_cut() {
        let conv = parse(r#"{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "x"}]}"#).unwrap();
        let (full_ids, full_mask) = render(&bpe(), &conv, usize::MAX).unwrap();
        for n in 0..full_ids.len() + 3 {
            let (ids, mask) = render(&bpe(), &conv, n).unwrap();
            let k = n.min(full_ids.len());
            assert_eq!(ids, full_ids[..k]);
            assert_eq!(mask, full_mask[..k]);
        }
    }

    #[test]
    fn completion_prompt() {
        let conv =
            parse(r#"[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]"#)
                .unwrap();
        assert_eq!(
            render_for_completion(&bpe(), &conv, 2048, "c").unwrap(),
            vec![BOS, US, b'q' as Rank, UE, AS]
        );
        let conv = parse(r#"[{"role": "user", "content": "q"}]"#).unwrap();
        assert!(render_for_completion(&bpe(), &conv, 2048, "c").is_err());
    }

    #[test]
    fn errors_name_location_message_and_reason() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"messages": []}"#,
                "message -: conversation has no messages",
            ),
            (r#"{"msgs": []}"#, "missing field \"messages\""),
            (
                r#"[{"role": "assistant", "content": "a"}]"#,
                "message 0: expected role user",
            ),
            (
                r#"[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]"#,
                "message 1: expected role assistant",
            ),
            (
                r#"[{"role": "system", "content": "s"}]"#,
                "message 0: system message is not followed",
            ),
            (
                r#"[{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]"#,
                "message 1: system message must be followed by a user",
            ),
            (
                r#"[{"role": "user", "content": ["x"]}]"#,
                "message 0: user content must be a string, got list",
            ),
            (
                r#"[{"role": "user", "content": 3}]"#,
                "message 0: user content must be a string, got number",
            ),
            (
                r#"[{"role": "user"}]"#,
                "message 0: missing field \"content\"",
            ),
            (r#"[{"content": "x"}]"#, "message 0: missing field \"role\""),
            (
                r#"[{"role": "bot", "content": "x"}]"#,
                "message 0: unknown role \"bot\"",
            ),
            (
                r#"[{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": ""}]}]"#,
                "message 1: part 0: unknown part type \"image\"",
            ),
            (
                r#"[{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text"}]}]"#,
                "message 1: part 0: missing field \"text\"",
            ),
            (
                r#"[{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "system", "content": "s"}]"#,
                "message 1",
            ),
            (
                r#"{"messages": [1]}"#,
                "message 0: a message must be an object",
            ),
            ("{not json", "invalid JSON"),
        ];
        for (line, want) in cases {
            let err = parse(line).unwrap_err().to_string();
            assert!(err.starts_with("test.jsonl:1: "), "{err}");
            assert!(err.contains(want), "{line}: {err} lacks {want}");
        }
    }

    #[test]
    fn missing_specials_is_an_error() {
        let ranks: FxHashMap<Vec<u8>, Rank> = (0u32..256).map(|b| (vec![b as u8], b)).collect();
        let bare = CoreBPE::new(ranks, NANOCHAT_PATTERN, vec![]).unwrap();
        let conv = parse(r#"[{"role": "user", "content": "q"}]"#).unwrap();
        assert!(render(&bare, &conv, 10).is_err());
    }

    /// A conversation must end with an assistant message (its reply is what gets dropped);
    /// the prompt is truncated to max_tokens, then <|assistant_start|> is appended (so
    /// max_tokens + 1 ids at most).
    #[test]
    fn completion_prompt_truncation_and_refusal() {
        let b = bpe();
        let conv = parse(
            r#"[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}]"#,
        )
        .unwrap();
        let err = render_for_completion(&b, &conv, 2048, "c")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("message 2: render_for_completion needs a conversation that ends with an assistant message"),
            "{err}"
        );
        let conv = parse(
            r#"[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "a"}]"#,
        )
        .unwrap();
        let mut full = vec![BOS, US];
        full.extend(bytes("hello"));
        full.push(UE);
        for n in 0..full.len() + 3 {
            let mut want = full[..n.min(full.len())].to_vec();
            want.push(AS);
            assert_eq!(
                render_for_completion(&b, &conv, n, "c").unwrap(),
                want,
                "max_tokens {n}"
            );
        }
    }

    /// Lone surrogates become U+FFFD, a low one alone on a line too, while a pair at the top of
    /// the range (low half \udfff) stays one character.
    #[test]
    fn lone_low_surrogates_alone_and_pairs_at_the_top_of_the_range() {
        assert_eq!(parse_json(br#"{"b": "\udc00"}"#).unwrap()["b"], "\u{FFFD}");
        assert_eq!(
            parse_json(br#"{"b": "x\udfffy"}"#).unwrap()["b"],
            "x\u{FFFD}y"
        );
        // the lone \ud800 forces the rewrite; the \ud83d\udfff pair (U+1F7FF) must survive it
        let v = parse_json(br#"{"a": "\ud800", "c": "\ud83d\udfff"}"#).unwrap();
        assert_eq!(v["a"], "\u{FFFD}");
        assert_eq!(v["c"], "\u{1F7FF}");
        // and a JSONL line with only a lone low surrogate renders (prep's path)
        let conv = parse(
            r#"[{"role": "user", "content": "\udc00"}, {"role": "assistant", "content": "a"}]"#,
        )
        .unwrap();
        let (ids, _) = render(&bpe(), &conv, 2048).unwrap();
        let mut want = vec![BOS, US];
        want.extend(bytes("\u{FFFD}"));
        want.extend([UE, AS, b'a' as Rank, AE]);
        assert_eq!(ids, want);
    }

    /// `Conversation::new` is public: its own check (not only the JSON and Python walkers')
    /// refuses parts in user and system messages.
    #[test]
    fn new_refuses_parts_outside_assistant_messages() {
        let parts = Content::Parts(vec![Part {
            kind: PartKind::Text,
            text: "x".into(),
        }]);
        let user = |content: Content| Message {
            role: Role::User,
            content,
        };
        let err = Conversation::new(vec![user(parts.clone())], "c")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("message 0: user content must be a string, got a list of parts"),
            "{err}"
        );
        let sys = Message {
            role: Role::System,
            content: parts,
        };
        let err = Conversation::new(vec![sys, user(Content::Text("q".into()))], "c")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("message 0: system content must be a string, got a list of parts"),
            "{err}"
        );
    }

    /// `render_into` limits only what it appends (every caller in the crate passes empty
    /// vectors, so only this test sees the difference).
    #[test]
    fn render_into_limits_only_what_it_appends() {
        let b = bpe();
        let tokens = ChatTokens::from_bpe(&b).unwrap();
        let conv = parse(
            r#"[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yo"}]"#,
        )
        .unwrap();
        let (full, full_mask) = render(&b, &conv, usize::MAX).unwrap();
        for n in [0, 1, 4, full.len(), full.len() + 2] {
            let (mut ids, mut mask) = (vec![1, 2, 3], vec![1, 0, 1]);
            render_into(&b, &tokens, &conv, n, &mut ids, &mut mask);
            let k = n.min(full.len());
            assert_eq!(
                (&ids[..3], &ids[3..]),
                (&[1, 2, 3][..], &full[..k]),
                "max_tokens {n}"
            );
            assert_eq!(
                (&mask[..3], &mask[3..]),
                (&[1, 0, 1][..], &full_mask[..k]),
                "max_tokens {n}"
            );
        }
    }
}
