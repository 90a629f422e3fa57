//! The CLI's stream-json output lines, read without copying their text.
//!
//! A reply's text is in its lines several times over (the deltas, the
//! assistant message, the result), and a tool's output can be megabytes.
//! So a line is parsed only as far as the service needs: its `type` and the
//! fields frames and responses read, each as a slice of the line
//! ([`RawValue`]). The text stays in the line ([`Text`]), and frames, the
//! history and the sync response take their parts from it.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;
use serde_json::value::RawValue;
use shared::Text;

/// The fields of a CLI message the service reads; text and JSON values as
/// slices of its line. Keys it does not read are skipped, not copied.
#[derive(Debug, Default, Deserialize)]
pub struct CliMessage<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    /// `stream_event`: the model's event.
    #[serde(borrow, default)]
    pub event: Option<StreamEvent<'a>>,
    /// `assistant`, `user`: the message.
    #[serde(borrow, default)]
    pub message: Option<MessageBody<'a>>,
    /// `result`: the final text (or the error).
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub subtype: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub is_error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub total_cost_usd: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub duration_ms: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub num_turns: Option<&'a RawValue>,
}

/// [`CliMessage`] with its nested parts unread, for a message whose parts
/// do not have the shapes the CLI writes.
#[derive(Debug, Default, Deserialize)]
struct LooseMessage<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
    #[serde(borrow, default)]
    message: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    subtype: Option<&'a RawValue>,
    #[serde(borrow, default)]
    is_error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    total_cost_usd: Option<&'a RawValue>,
    #[serde(borrow, default)]
    usage: Option<&'a RawValue>,
    #[serde(borrow, default)]
    duration_ms: Option<&'a RawValue>,
    #[serde(borrow, default)]
    num_turns: Option<&'a RawValue>,
}

impl<'a> CliMessage<'a> {
    /// Reads a line in one pass when it has the CLI's shapes. A line of
    /// JSON whose parts have other shapes reads as far as they fit (as an
    /// absent key reads in a `Value`; a duplicate key, which the CLI never
    /// writes, leaves it unread); not JSON is an error.
    pub fn parse(line: &'a str) -> Result<Self, serde_json::Error> {
        // serde reads a struct from an array too (`["result"]` would read as
        // a result): only an object is a message.
        if !line.trim_start().starts_with('{') {
            serde_json::from_str::<IgnoredAny>(line)?;
            return Ok(CliMessage::default());
        }
        let first = match serde_json::from_str::<CliMessage>(line) {
            Ok(message) => return Ok(message),
            Err(error) => error,
        };
        serde_json::from_str::<IgnoredAny>(line)?;
        tracing::trace!(error = %first, "a CLI line read loosely");
        let loose: LooseMessage = serde_json::from_str(line).unwrap_or_default();
        Ok(CliMessage {
            kind: loose.kind,
            event: view(loose.event),
            message: view(loose.message),
            result: loose.result,
            subtype: loose.subtype,
            is_error: loose.is_error,
            total_cost_usd: loose.total_cost_usd,
            usage: loose.usage,
            duration_ms: loose.duration_ms,
            num_turns: loose.num_turns,
        })
    }
}

/// A line of the CLI's output that is JSON, and its `type`.
#[derive(Debug, Clone)]
pub struct CliLine {
    /// `None` for JSON that is no object with a string `type`.
    pub kind: Option<String>,
    /// JSON without a CR (see [`without_cr`]).
    pub line: Text,
}

impl CliLine {
    /// Reads one output line; an error when it is not JSON.
    pub fn read(line: Text) -> Result<CliLine, serde_json::Error> {
        Self::read_with(line, |_, _| {})
    }

    /// [`CliLine::read`], handing the line and its fields to `inspect`
    /// while they are parsed: one pass over a line that may hold a reply
    /// of megabytes.
    pub fn read_with(line: Text, inspect: impl FnOnce(&Text, &CliMessage)) -> Result<CliLine, serde_json::Error> {
        let line = without_cr(line)?;
        let message = CliMessage::parse(&line)?;
        inspect(&line, &message);
        let kind = message.kind.map(Cow::into_owned);
        Ok(CliLine { kind, line })
    }

    /// The fields the service reads (none for a line that is no object).
    pub fn message(&self) -> CliMessage<'_> {
        CliMessage::parse(&self.line).unwrap_or_default()
    }

    pub fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }
}

/// The line, or when it holds a CR (JSON whitespace between tokens, which
/// SSE cannot carry as it is), the line written anew.
fn without_cr(line: Text) -> Result<Text, serde_json::Error> {
    if memchr::memchr(b'\r', line.as_bytes()).is_none() {
        return Ok(line);
    }
    Ok(serde_json::from_str::<Value>(&line)?.to_string().into())
}

/// A JSON string's text: `Some` when `raw` is a JSON string.
pub fn string(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    raw.filter(|raw| raw.get().starts_with('"')).and_then(|raw| serde_json::from_str(raw.get()).ok())
}

/// `raw` when it is a JSON string literal (quotes and escapes included).
pub fn string_literal(raw: Option<&RawValue>) -> Option<&str> {
    raw.map(RawValue::get).filter(|json| json.starts_with('"'))
}

/// A part of a message read into `T`; `None` when it does not have that
/// shape (as an absent key reads in a `Value`).
pub fn view<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Option<T> {
    serde_json::from_str(raw?.get()).ok()
}

/// `stream_event`'s event, as far as frames read it.
#[derive(Debug, Deserialize)]
pub struct StreamEvent<'a> {
    #[serde(borrow, default)]
    pub delta: Option<Delta<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct Delta<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub text: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub thinking: Option<&'a RawValue>,
}

/// An `assistant` or `user` message, as far as the service reads it.
#[derive(Debug, Default, Deserialize)]
pub struct MessageBody<'a> {
    #[serde(borrow, default)]
    pub content: Content<'a>,
}

impl MessageBody<'_> {
    /// The content's blocks; none when the content is plain text.
    pub fn blocks(&self) -> &[Block<'_>] {
        match &self.content {
            Content::Blocks(blocks) => blocks,
            Content::Absent | Content::Text => &[],
        }
    }
}

/// A message's content: plain text (a user's message, not read) or blocks.
#[derive(Debug, Default)]
pub enum Content<'a> {
    #[default]
    Absent,
    Text,
    Blocks(Vec<Block<'a>>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Content<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> serde::de::Visitor<'de> for ContentVisitor {
            type Value = Content<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content blocks")
            }

            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Content::Text)
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Content::Absent)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut blocks = Vec::new();
                while let Some(block) = seq.next_element()? {
                    blocks.push(block);
                }
                Ok(Content::Blocks(blocks))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

#[derive(Debug, Deserialize)]
pub struct Block<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Option<Cow<'a, str>>,
    /// `tool_use`
    #[serde(borrow, default)]
    pub name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub input: Option<&'a RawValue>,
    /// `tool_result`
    #[serde(borrow, default)]
    pub content: Option<&'a RawValue>,
}

impl Block<'_> {
    pub fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_read_without_its_text_and_odd_lines_are_written_anew() {
        let line = CliLine::read(Text::from(
            r#"{"type":"result","result":"a \"big\" text","is_error":false,"usage":{"input_tokens":3},"x":[1]}"#,
        ))
        .expect("json");
        assert!(line.is("result"));
        let message = line.message();
        assert_eq!(string_literal(message.result), Some(r#""a \"big\" text""#));
        assert_eq!(string(message.result).as_deref(), Some(r#"a "big" text"#));
        assert!(line.line.part(message.result.expect("result").get()).is_some(), "the text was copied");
        assert_eq!(message.usage.map(RawValue::get), Some(r#"{"input_tokens":3}"#));
        // A CR between tokens (SSE cannot carry it) and a duplicate key.
        let line = CliLine::read(Text::from("{\"type\":\"user\",\r\n\"a\":1}")).expect("json");
        assert_eq!(line.line, r#"{"a":1,"type":"user"}"#);
        // A duplicate key (the CLI writes none) leaves the line unread, not lost.
        let line = CliLine::read(Text::from(r#"{"type":"user","type":"assistant"}"#)).expect("json");
        assert_eq!(line.kind, None, "{line:?}");
        // JSON that is no message is read, with no type; not JSON is an error.
        for other in ["[1,2]", r#"["result"]"#, "\"text\"", r#"{"type":7}"#, "{}"] {
            assert_eq!(CliLine::read(Text::from(other)).expect(other).kind, None, "{other}");
        }
        assert!(CliLine::read(Text::from("{\"type\":")).is_err());
    }

    #[test]
    fn blocks_of_a_message_and_raw_json_in_a_response() {
        let line = CliLine::read(Text::from(
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"hi"},{"type":"tool_use","name":"Bash","input":{"command":"ls"}}]}}"#,
        ))
        .expect("json");
        let message = line.message();
        let blocks = message.message.as_ref().map(MessageBody::blocks).unwrap_or_default();
        assert_eq!(blocks.len(), 2);
        assert!(blocks[1].is("tool_use"));
        assert_eq!(string(blocks[1].name).as_deref(), Some("Bash"));
        assert_eq!(blocks[1].input.map(RawValue::get), Some(r#"{"command":"ls"}"#));
        // Plain text content has no blocks.
        let user = CliLine::read(Text::from(r#"{"type":"user","message":{"content":"hello"}}"#)).expect("json");
        assert!(matches!(user.message().message, Some(MessageBody { content: Content::Text })));
        // Content that is neither text nor blocks reads as absent, the rest of the line still reads.
        let odd =
            CliLine::read(Text::from(r#"{"type":"assistant","message":{"content":[1]},"result":"r"}"#)).expect("json");
        let message = odd.message();
        assert!(odd.is("assistant") && message.message.is_none() && message.result.is_some(), "{message:?}");
    }
}
