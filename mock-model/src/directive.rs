//! Parsing the `mock:` directives in the last user message (syntax: see the crate docs).

use std::time::Duration;

use serde_json::{Map, Value};

/// The prefix that marks a directive line (after optional leading whitespace).
pub const PREFIX: &str = "mock:";

/// What the last user message asks the mock to do. Built by [`Script::parse`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Script {
    /// `mock:reply` lines, in order (joined with `\n` into the reply text).
    pub replies: Vec<String>,
    /// `mock:thinking` lines, in order (joined with `\n` into one thinking block).
    pub thinking: Vec<String>,
    /// `mock:tool NAME JSON` lines: tool calls, all in one assistant message.
    pub tools: Vec<ToolCall>,
    /// `mock:slow MS N`.
    pub slow: Option<Slow>,
    /// `mock:fail STATUS TIMES ...`.
    pub fail: Option<Fail>,
    /// `mock:cut [TIMES] ...`.
    pub cut: Option<Cut>,
    /// `mock:max-tokens`.
    pub max_tokens: bool,
    /// `mock:delay MS`.
    pub delay: Option<Duration>,
    /// `mock:reply-bytes N`: a reply text of `N` bytes of filler.
    pub reply_bytes: Option<usize>,
    /// The text lines that are not directives (trimmed as a whole), used for the default `echo:` reply.
    pub plain_text: String,
}

/// One scripted tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The tool's name, e.g. `Bash`.
    pub name: String,
    /// The tool's input (a JSON object).
    pub input: Map<String, Value>,
}

/// Slow streaming: `deltas` text deltas, each sent `per_delta` after the previous event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slow {
    /// The pause before each text delta.
    pub per_delta: Duration,
    /// How many text deltas the reply text is split into.
    pub deltas: usize,
}

/// Fail the first `times` requests that carry this directive line.
#[derive(Debug, Clone, PartialEq)]
pub struct Fail {
    /// The whole directive line (trimmed): the key its count is kept under.
    pub key: String,
    /// The HTTP status to answer with.
    pub status: u16,
    /// How many requests fail before one succeeds.
    pub times: u32,
    /// The `error.type` in the body (default from the status).
    pub error_type: String,
    /// A `retry-after` header (seconds), if given.
    pub retry_after: Option<String>,
    /// A `retry-after-ms` header, if given.
    pub retry_after_ms: Option<String>,
    /// An `x-should-retry` header, if given.
    pub should_retry: Option<bool>,
}

/// Cut the connection in the middle of the first `times` responses that carry this directive line.
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    /// The whole directive line (trimmed): the key its count is kept under.
    pub key: String,
    /// How many responses are cut before one is sent whole.
    pub times: u32,
}

impl Script {
    /// Parse the user's text. Lines starting with `mock:` (after leading whitespace) are directives; an unknown
    /// or malformed directive is an error (the mock answers 400 with this message).
    pub fn parse(text: &str) -> Result<Script, String> {
        let mut script = Script::default();
        let mut plain = Vec::new();
        for line in text.lines() {
            let trimmed = line.trim_start();
            let Some(rest) = trimmed.strip_prefix(PREFIX) else {
                plain.push(line);
                continue;
            };
            let (name, arg) = match rest.split_once(char::is_whitespace) {
                Some((name, arg)) => (name, arg),
                None => (rest, ""),
            };
            let key = trimmed.trim_end().to_owned();
            match name {
                "reply" => script.replies.push(strip_one_space(rest, name).to_owned()),
                "thinking" => script.thinking.push(strip_one_space(rest, name).to_owned()),
                "tool" => script.tools.push(parse_tool(arg)?),
                "slow" => script.slow = Some(parse_slow(arg)?),
                "fail" => script.fail = Some(parse_fail(arg, key)?),
                "cut" => script.cut = Some(parse_cut(arg, key)?),
                "max-tokens" => script.max_tokens = true,
                "delay" => {
                    let ms = parse_num::<u64>(arg.trim(), "mock:delay MS")?;
                    script.delay = Some(Duration::from_millis(ms));
                }
                "reply-bytes" => script.reply_bytes = Some(parse_num::<usize>(arg.trim(), "mock:reply-bytes N")?),
                other => {
                    return Err(format!(
                        "unknown directive `mock:{other}` (known: reply, reply-bytes, thinking, tool, slow, fail, cut, max-tokens, delay)"
                    ));
                }
            }
        }
        script.plain_text = plain.join("\n").trim().to_owned();
        Ok(script)
    }

    /// Whether any directive was given.
    pub fn has_directives(&self) -> bool {
        *self != Script { plain_text: self.plain_text.clone(), ..Script::default() }
    }
}

/// The text after `mock:NAME` with exactly one separating space removed (so `mock:reply  x` keeps ` x`).
fn strip_one_space<'a>(rest: &'a str, name: &str) -> &'a str {
    let after = &rest[name.len()..];
    let after = after.strip_suffix('\r').unwrap_or(after);
    after.strip_prefix(' ').or_else(|| after.strip_prefix('\t')).unwrap_or(after)
}

fn parse_num<T: std::str::FromStr>(s: &str, usage: &str) -> Result<T, String> {
    s.parse::<T>().map_err(|_| format!("expected `{usage}`, got number `{s}`"))
}

fn parse_tool(arg: &str) -> Result<ToolCall, String> {
    let arg = arg.trim();
    let (name, json) = arg.split_once(char::is_whitespace).unwrap_or((arg, "{}"));
    if name.is_empty() {
        return Err("expected `mock:tool NAME {json input}`".into());
    }
    match serde_json::from_str::<Value>(json.trim()) {
        Ok(Value::Object(input)) => Ok(ToolCall { name: name.to_owned(), input }),
        Ok(_) => Err(format!("mock:tool {name}: the input must be a JSON object")),
        Err(e) => Err(format!("mock:tool {name}: the input is not valid JSON: {e}")),
    }
}

fn parse_slow(arg: &str) -> Result<Slow, String> {
    let usage = "mock:slow MS N";
    let mut words = arg.split_whitespace();
    let ms = parse_num::<u64>(words.next().unwrap_or(""), usage)?;
    let deltas = match words.next() {
        Some(n) => parse_num::<usize>(n, usage)?,
        None => 10,
    };
    if deltas == 0 {
        return Err("mock:slow: N must be at least 1".into());
    }
    Ok(Slow { per_delta: Duration::from_millis(ms), deltas })
}

/// The Anthropic `error.type` for an HTTP status.
pub fn error_type_for(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

fn parse_fail(arg: &str, key: String) -> Result<Fail, String> {
    let usage =
        "mock:fail STATUS TIMES [type=T] [retry-after=S] [retry-after-ms=MS] [should-retry=true|false] [tag...]";
    let mut words = arg.split_whitespace();
    let status = parse_num::<u16>(words.next().unwrap_or(""), usage)?;
    if !(400..=599).contains(&status) {
        return Err(format!("mock:fail: status {status} is not an error status (400-599)"));
    }
    let times = parse_num::<u32>(words.next().unwrap_or(""), usage)?;
    let mut fail = Fail {
        key,
        status,
        times,
        error_type: error_type_for(status).to_owned(),
        retry_after: None,
        retry_after_ms: None,
        should_retry: None,
    };
    for word in words {
        match word.split_once('=') {
            Some(("type", t)) => fail.error_type = t.to_owned(),
            Some(("retry-after", s)) => fail.retry_after = Some(s.to_owned()),
            Some(("retry-after-ms", s)) => fail.retry_after_ms = Some(s.to_owned()),
            Some(("should-retry", "true")) => fail.should_retry = Some(true),
            Some(("should-retry", "false")) => fail.should_retry = Some(false),
            Some(("should-retry", other)) => {
                return Err(format!("mock:fail: should-retry={other}: expected true|false"));
            }
            _ => {} // a tag: only makes the line (and so its count) distinct
        }
    }
    Ok(fail)
}

fn parse_cut(arg: &str, key: String) -> Result<Cut, String> {
    let times = match arg.split_whitespace().next() {
        Some(n) if n.bytes().all(|b| b.is_ascii_digit()) => parse_num::<u32>(n, "mock:cut [TIMES] [tag...]")?,
        _ => 1,
    };
    Ok(Cut { key, times })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_directives() {
        let s = Script::parse("hello\nworld ").expect("parse");
        assert!(!s.has_directives());
        assert_eq!(s.plain_text, "hello\nworld");
    }

    #[test]
    fn all_directives() {
        let text = "please\nmock:thinking hmm\nmock:reply  two spaces\nmock:reply second\n\
                    mock:tool Bash {\"command\": \"ls\"}\nmock:tool Read {\"file_path\":\"/x\"}\n\
                    mock:slow 200 5\nmock:fail 529 2 tag1\nmock:cut 3 x\nmock:max-tokens\nmock:delay 50";
        let s = Script::parse(text).expect("parse");
        assert!(s.has_directives());
        assert_eq!(s.plain_text, "please");
        assert_eq!(s.thinking, vec!["hmm"]);
        assert_eq!(s.replies, vec![" two spaces", "second"]);
        assert_eq!(s.tools.len(), 2);
        assert_eq!(s.tools[0].name, "Bash");
        assert_eq!(s.tools[0].input["command"], "ls");
        assert_eq!(s.slow, Some(Slow { per_delta: Duration::from_millis(200), deltas: 5 }));
        let fail = s.fail.expect("fail");
        assert_eq!((fail.status, fail.times, fail.error_type.as_str()), (529, 2, "overloaded_error"));
        assert_eq!(fail.key, "mock:fail 529 2 tag1");
        assert_eq!(s.cut, Some(Cut { key: "mock:cut 3 x".into(), times: 3 }));
        assert!(s.max_tokens);
        assert_eq!(s.delay, Some(Duration::from_millis(50)));
    }

    #[test]
    fn fail_options() {
        let s = Script::parse("mock:fail 429 1 type=foo retry-after=0 retry-after-ms=5 should-retry=false").expect("p");
        let f = s.fail.expect("fail");
        assert_eq!(f.error_type, "foo");
        assert_eq!(f.retry_after.as_deref(), Some("0"));
        assert_eq!(f.retry_after_ms.as_deref(), Some("5"));
        assert_eq!(f.should_retry, Some(false));
    }

    #[test]
    fn errors() {
        assert!(Script::parse("mock:nope").is_err());
        assert!(Script::parse("mock:tool Bash [1]").is_err());
        assert!(Script::parse("mock:tool Bash {").is_err());
        assert!(Script::parse("mock:fail 200 1").is_err());
        assert!(Script::parse("mock:slow x").is_err());
        assert!(Script::parse("mock:slow 10 0").is_err());
        // `Mock:` is not a directive (case-sensitive).
        assert!(!Script::parse("Mock:reply x").expect("parse").has_directives());
    }

    #[test]
    fn reply_bytes() {
        let s = Script::parse("mock:reply-bytes 1048576").expect("parse");
        assert!(s.has_directives());
        assert_eq!(s.reply_bytes, Some(1_048_576));
        // Not a `mock:reply` line with the text `-bytes …`.
        assert!(s.replies.is_empty());
        assert!(Script::parse("mock:reply-bytes").is_err());
        assert!(Script::parse("mock:reply-bytes 1MB").is_err());
    }

    #[test]
    fn tool_without_input() {
        let s = Script::parse("mock:tool Glob").expect("parse");
        assert_eq!(s.tools[0].name, "Glob");
        assert!(s.tools[0].input.is_empty());
    }
}
