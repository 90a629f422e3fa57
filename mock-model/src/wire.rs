//! The Messages API wire format: reading requests, building `Message` JSON and the SSE event sequence.

use std::time::Duration;

use serde_json::{Map, Value, json};

/// Text blocks whose whole text is a `<system-reminder>…</system-reminder>` are added by the CLI, not typed by
/// the user: they are left out of the user's text (and so never hold directives).
pub fn is_system_reminder(text: &str) -> bool {
    let t = text.trim();
    t.starts_with("<system-reminder>") && t.ends_with("</system-reminder>")
}

/// A message's content as blocks (a string content is one text block).
pub fn blocks(message: &Value) -> Vec<Value> {
    match message.get("content") {
        Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    }
}

/// The user-typed text of a message: its text blocks except system reminders, joined with `\n`.
pub fn user_text(message: &Value) -> String {
    blocks(message)
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .filter(|t| !is_system_reminder(t))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `tool_result` block's content as text (text parts joined with `\n`; other parts as `[type]`).
pub fn tool_result_text(block: &Value) -> String {
    match block.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").and_then(Value::as_str).unwrap_or_default().to_owned(),
                Some(other) => format!("[{other}]"),
                None => String::new(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The size of the text deltas of a `mock:reply-bytes` reply: big replies in word-sized deltas would be millions
/// of events.
pub const BULK_TEXT_DELTA_BYTES: usize = 64 * 1024;

/// `len` bytes of printable ASCII words and spaces (no newline, nothing JSON escapes, so the text's JSON is as long
/// as the text), for `mock:reply-bytes`.
pub fn filler_text(len: usize) -> String {
    const PATTERN: &str = "the quick brown fox jumps over the lazy dog ";
    let mut text = PATTERN.repeat(len.div_ceil(PATTERN.len()));
    text.truncate(len);
    text
}

/// Roughly 4 bytes a token, at least 1.
pub fn tokens_for_len(len: usize) -> u64 {
    (len as u64).div_ceil(4).max(1)
}

/// One content block of a reply.
#[derive(Debug, Clone)]
pub enum Block {
    /// A thinking block (with a fake signature).
    Thinking { thinking: String, signature: String },
    /// A text block.
    Text { text: String },
    /// A tool call.
    ToolUse { id: String, name: String, input: Map<String, Value> },
}

impl Block {
    /// The block as it appears in a non-streamed `Message`.
    pub fn to_json(&self) -> Value {
        match self {
            Block::Thinking { thinking, signature } => {
                json!({"type": "thinking", "thinking": thinking, "signature": signature})
            }
            Block::Text { text } => json!({"type": "text", "text": text}),
            Block::ToolUse { id, name, input } => json!({"type": "tool_use", "id": id, "name": name, "input": input}),
        }
    }

    /// The block as announced by `content_block_start` (empty, filled in by the deltas).
    fn start_json(&self) -> Value {
        match self {
            Block::Thinking { .. } => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Block::Text { .. } => json!({"type": "text", "text": ""}),
            Block::ToolUse { id, name, .. } => json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
        }
    }

    /// How many output tokens the block counts for.
    pub fn output_len(&self) -> usize {
        match self {
            Block::Thinking { thinking, .. } => thinking.len(),
            Block::Text { text } => text.len(),
            Block::ToolUse { name, input, .. } => name.len() + Value::Object(input.clone()).to_string().len(),
        }
    }
}

/// A complete scripted reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// `msg_…`.
    pub id: String,
    /// Echoes the request's model.
    pub model: String,
    /// The content blocks, in order.
    pub blocks: Vec<Block>,
    /// `end_turn`, `tool_use` or `max_tokens`.
    pub stop_reason: &'static str,
    /// Usage reported.
    pub input_tokens: u64,
    /// Usage reported.
    pub output_tokens: u64,
    /// Slow text streaming: the pause before each text delta and how many text deltas.
    pub slow: Option<(Duration, usize)>,
    /// Text streamed in deltas of at most this many bytes instead of word-sized ones (`slow` wins).
    pub text_delta_bytes: Option<usize>,
}

fn usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "service_tier": "standard",
    })
}

impl Reply {
    /// The non-streamed `Message` JSON.
    pub fn message_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.blocks.iter().map(Block::to_json).collect::<Vec<_>>(),
            "stop_reason": self.stop_reason,
            "stop_sequence": null,
            "usage": usage(self.input_tokens, self.output_tokens),
        })
    }

    /// The streamed events, in order, with the pauses before them.
    pub fn events(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut start = self.message_json();
        start["content"] = json!([]);
        start["stop_reason"] = Value::Null;
        start["usage"] = usage(self.input_tokens, 1);
        steps.push(Step::event("message_start", json!({"type": "message_start", "message": start})));
        steps.push(Step::event("ping", json!({"type": "ping"})));
        for (index, block) in self.blocks.iter().enumerate() {
            steps.push(Step::event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": block.start_json()}),
            ));
            let delta = |delta: Value| {
                Step::event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": delta}),
                )
            };
            match block {
                Block::Thinking { thinking, signature } => {
                    for piece in word_chunks(thinking) {
                        steps.push(delta(json!({"type": "thinking_delta", "thinking": piece})));
                    }
                    steps.push(delta(json!({"type": "signature_delta", "signature": signature})));
                }
                Block::Text { text } => match (self.slow, self.text_delta_bytes) {
                    (Some((pause, n)), _) => {
                        for piece in even_chunks(text, n) {
                            steps.push(Step::Sleep(pause));
                            steps.push(delta(json!({"type": "text_delta", "text": piece})));
                        }
                    }
                    (None, Some(max)) => {
                        for piece in byte_chunks(text, max) {
                            steps.push(delta(json!({"type": "text_delta", "text": piece})));
                        }
                    }
                    (None, None) => {
                        for piece in word_chunks(text) {
                            steps.push(delta(json!({"type": "text_delta", "text": piece})));
                        }
                    }
                },
                Block::ToolUse { input, .. } => {
                    let input = Value::Object(input.clone()).to_string();
                    for piece in even_chunks(&input, 3) {
                        steps.push(delta(json!({"type": "input_json_delta", "partial_json": piece})));
                    }
                }
            }
            steps.push(Step::event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        }
        steps.push(Step::event(
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": null},
                "usage": usage(self.input_tokens, self.output_tokens),
            }),
        ));
        steps.push(Step::event("message_stop", json!({"type": "message_stop"})));
        steps
    }
}

/// One step of a streamed response.
#[derive(Debug, Clone)]
pub enum Step {
    /// An SSE event: its name and `data` JSON.
    Event(&'static str, Value),
    /// Raw bytes (a part of a non-streamed body).
    Raw(Vec<u8>),
    /// A pause.
    Sleep(Duration),
    /// Close the connection here, without finishing the response.
    Cut,
}

impl Step {
    fn event(name: &'static str, data: Value) -> Step {
        Step::Event(name, data)
    }

    /// The SSE bytes of an event step.
    pub fn sse(name: &str, data: &Value) -> String {
        format!("event: {name}\ndata: {data}\n\n")
    }
}

/// Split into small word-sized pieces: each piece is a word with its following whitespace, at most 12 chars.
pub fn word_chunks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in text.split_inclusive(char::is_whitespace) {
        let chars: Vec<char> = word.chars().collect();
        for piece in chars.chunks(12) {
            out.push(piece.iter().collect());
        }
    }
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

/// Split into `n` pieces of near-equal length in chars (fewer if the text has fewer than `n` chars; one empty
/// piece for empty text).
pub fn even_chunks(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = n.clamp(1, chars.len().max(1));
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let from = chars.len() * i / n;
        let to = chars.len() * (i + 1) / n;
        out.push(chars[from..to].iter().collect());
    }
    out
}

/// Split into pieces of at most `max` bytes, cut at char boundaries (a piece holds at least one char; one empty
/// piece for empty text).
pub fn byte_chunks(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::with_capacity(text.len() / max.max(1) + 1);
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = max.min(rest.len());
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        if end == 0 {
            end = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let (piece, tail) = rest.split_at(end);
        out.push(piece);
        rest = tail;
    }
    if out.is_empty() {
        out.push("");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip() {
        let text = "hello wonderful world, a verylongwordthatisover12chars here";
        assert_eq!(word_chunks(text).concat(), text);
        assert!(word_chunks(text).len() >= 5);
        for n in 1..20 {
            let pieces = even_chunks(text, n);
            assert_eq!(pieces.len(), n);
            assert_eq!(pieces.concat(), text);
        }
        assert_eq!(even_chunks("ab", 5), vec!["a", "b"]);
        assert_eq!(even_chunks("", 5), vec![""]);
        for max in 1..20 {
            let pieces = byte_chunks(text, max);
            assert!(pieces.iter().all(|p| p.len() <= max));
            assert_eq!(pieces.concat(), text);
        }
        // Never inside a char: a 2-byte `é` with room for 1 byte goes whole.
        assert_eq!(byte_chunks("aéb", 1), vec!["a", "é", "b"]);
        assert_eq!(byte_chunks("aéb", 2), vec!["a", "é", "b"]);
        assert_eq!(byte_chunks("", 4), vec![""]);
    }

    #[test]
    fn filler_text_is_exact_and_plain() {
        for len in [0, 1, 43, 44, 45, 100_000] {
            let text = filler_text(len);
            assert_eq!(text.len(), len);
            assert!(text.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
            // Nothing to escape: its JSON is the text and two quotes.
            assert_eq!(Value::String(text).to_string().len(), len + 2);
        }
    }

    #[test]
    fn user_text_skips_reminders() {
        let m = json!({"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nx\n</system-reminder>\n"},
            {"type": "text", "text": "hi"},
            {"type": "tool_result", "tool_use_id": "t", "content": "c"},
        ]});
        assert_eq!(user_text(&m), "hi");
        assert_eq!(user_text(&json!({"role": "user", "content": "plain"})), "plain");
    }

    #[test]
    fn tool_result_content_forms() {
        assert_eq!(tool_result_text(&json!({"content": "x"})), "x");
        let parts =
            json!({"content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]});
        assert_eq!(tool_result_text(&parts), "a\n[image]\nb");
        assert_eq!(tool_result_text(&json!({})), "");
    }
}
