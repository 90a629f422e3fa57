//! Syntactic validation of the names that become path components.
//!
//! The rules are the seed service's (`^[A-Za-z0-9_-]+$`, 1–64 characters for
//! a user id, at most 200 for a sub-directory) made strict: a sub-directory is
//! a relative path of such segments, so `..`, `.`, absolute paths, empty
//! segments, NUL bytes and anything else that a file system could interpret
//! are refused before any file is touched.

use std::fmt;

/// Longest user id the seed accepted.
pub const MAX_USER_ID_LEN: usize = 64;
/// Longest session id accepted in a path or body (the seed's chat limit).
pub const MAX_SESSION_ID_LEN: usize = 200;
/// Longest `subdir` the seed accepted.
pub const MAX_SUBDIR_LEN: usize = 200;

/// Why a name was refused; the message is shown to API callers as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {max} characters, got {got}")]
    TooLong { max: usize, got: usize },
    #[error("must not contain NUL bytes")]
    Nul,
    #[error("must be a relative path, not an absolute one")]
    Absolute,
    #[error("must not contain '..' or '.' segments")]
    DotSegment,
    #[error("must not contain empty segments ('//')")]
    EmptySegment,
    #[error("may only contain letters, digits, '_' and '-' (got {0:?})")]
    BadCharacter(char),
}

/// True for the characters the seed's `^[A-Za-z0-9_-]+$` accepts.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Checks one `[A-Za-z0-9_-]+` token of at most `max` characters.
fn check_token(value: &str, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty);
    }
    if value.contains('\0') {
        return Err(NameError::Nul);
    }
    let len = value.chars().count();
    if len > max {
        return Err(NameError::TooLong { max, got: len });
    }
    match value.chars().find(|c| !is_name_char(*c)) {
        Some(c) => Err(NameError::BadCharacter(c)),
        None => Ok(()),
    }
}

/// A user id: 1–64 characters of `[A-Za-z0-9_-]`. It is also the name of the
/// user's directory under `user.base_dir`.
pub fn validate_user_id(value: &str) -> Result<(), NameError> {
    check_token(value, MAX_USER_ID_LEN)
}

/// A session id as accepted in URLs and bodies: 1–200 characters of
/// `[A-Za-z0-9_-]` (ours are UUIDs, the seed allowed any such token).
pub fn validate_session_id(value: &str) -> Result<(), NameError> {
    check_token(value, MAX_SESSION_ID_LEN)
}

/// A validated, normalised sub-directory: `/`-separated segments of
/// `[A-Za-z0-9_-]`, at most 200 characters. Outer slashes are stripped as
/// the seed did (`"/a/b/"` is `a/b`)... except that a leading slash means an
/// absolute path, which is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subdir(String);

impl Subdir {
    /// Parses a sub-directory; `""` and `"/"`-only inputs are refused as
    /// empty (omit the field instead).
    pub fn parse(value: &str) -> Result<Self, NameError> {
        if value.contains('\0') {
            return Err(NameError::Nul);
        }
        let len = value.chars().count();
        if len > MAX_SUBDIR_LEN {
            return Err(NameError::TooLong { max: MAX_SUBDIR_LEN, got: len });
        }
        if value.starts_with('/') {
            return Err(NameError::Absolute);
        }
        let trimmed = value.strip_suffix('/').unwrap_or(value);
        if trimmed.is_empty() {
            return Err(NameError::Empty);
        }
        for segment in trimmed.split('/') {
            match segment {
                "" => return Err(NameError::EmptySegment),
                "." | ".." => return Err(NameError::DotSegment),
                s if s.contains("..") => return Err(NameError::DotSegment),
                s => check_token(s, MAX_SUBDIR_LEN)?,
            }
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subdir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_the_seed_regex() {
        assert!(validate_user_id("alice_01-x").is_ok());
        assert_eq!(validate_user_id(""), Err(NameError::Empty));
        assert_eq!(validate_user_id("a.b"), Err(NameError::BadCharacter('.')));
        assert_eq!(validate_user_id("a/b"), Err(NameError::BadCharacter('/')));
        assert_eq!(validate_user_id("é"), Err(NameError::BadCharacter('é')));
        assert_eq!(validate_user_id("a\0"), Err(NameError::Nul));
        assert!(validate_user_id(&"a".repeat(64)).is_ok());
        assert_eq!(validate_user_id(&"a".repeat(65)), Err(NameError::TooLong { max: 64, got: 65 }));
    }

    #[test]
    fn subdirs_are_relative_paths_of_plain_segments() {
        assert_eq!(Subdir::parse("proj/src").map(|s| s.0), Ok("proj/src".into()));
        assert_eq!(Subdir::parse("proj/").map(|s| s.0), Ok("proj".into()));
        assert_eq!(Subdir::parse("/etc"), Err(NameError::Absolute));
        assert_eq!(Subdir::parse("a/../b"), Err(NameError::DotSegment));
        assert_eq!(Subdir::parse(".."), Err(NameError::DotSegment));
        assert_eq!(Subdir::parse("a/./b"), Err(NameError::DotSegment));
        assert_eq!(Subdir::parse("a//b"), Err(NameError::EmptySegment));
        assert_eq!(Subdir::parse(""), Err(NameError::Empty));
        assert_eq!(Subdir::parse("a\0b"), Err(NameError::Nul));
        assert_eq!(Subdir::parse("a b"), Err(NameError::BadCharacter(' ')));
        assert!(matches!(Subdir::parse(&"a".repeat(201)), Err(NameError::TooLong { max: 200, .. })));
        let nested = Subdir::parse("x/y/z").expect("valid");
        assert_eq!(nested.segments().collect::<Vec<_>>(), ["x", "y", "z"]);
    }
}
