//! Users' working directories: `<user.base_dir>/<user_id>[/<subdir>]`.
//!
//! Names are first checked syntactically ([`shared::names`]); then every
//! component is opened *beneath* the base directory's file descriptor with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV)`, one component at a time, creating missing ones with
//! `mkdirat` when `user.auto_create_dir` is on. The kernel refuses any
//! symlink or mount crossing during resolution, so a symlink planted in a
//! user's directory cannot lead out, even if swapped in concurrently
//! (`canonicalize` + `starts_with` is racy: see SANDBOX.md).

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use shared::names::{NameError, Subdir};

/// Why a directory could not be used; the API answers 400 naming `field`
/// (or 503 for `Io`).
#[derive(Debug, thiserror::Error)]
pub enum UserDirError {
    #[error("{field}: {source}")]
    InvalidName { field: &'static str, source: NameError },
    #[error("{field}: path component {component:?} is a symbolic link or leaves the user's directory")]
    Escapes { field: &'static str, component: String },
    #[error("{field}: path component {component:?} exists but is not a directory")]
    NotADirectory { field: &'static str, component: String },
    #[error("{field}: directory {component:?} does not exist and user.auto_create_dir is off")]
    Missing { field: &'static str, component: String },
    #[error("user.base_dir {path}: {source}")]
    BaseDir { path: PathBuf, source: io::Error },
    #[error("cannot open {component:?}: {source}")]
    Io { component: String, source: io::Error },
}

impl UserDirError {
    /// The request field the error concerns, if the caller caused it.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidName { field, .. }
            | Self::Escapes { field, .. }
            | Self::NotADirectory { field, .. }
            | Self::Missing { field, .. } => Some(field),
            Self::BaseDir { .. } | Self::Io { .. } => None,
        }
    }
}

/// The base directory of all users, opened once.
#[derive(Debug)]
pub struct UserDirs {
    base_path: PathBuf,
    base_fd: OwnedFd,
    auto_create: bool,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

impl UserDirs {
    /// Opens (and with `auto_create`, creates) the base directory.
    pub fn open(base: &Path, auto_create: bool) -> Result<Self, UserDirError> {
        let base_err = |source| UserDirError::BaseDir { path: base.to_path_buf(), source };
        if auto_create {
            std::fs::create_dir_all(base).map_err(base_err)?;
        }
        let base_path = std::fs::canonicalize(base).map_err(base_err)?;
        let base_fd = rustix::fs::open(
            &base_path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| base_err(e.into()))?;
        Ok(Self { base_path, base_fd, auto_create })
    }

    pub fn base_path(&self) -> &Path {
        &self.base_path
    }

    /// Resolves (creating as configured) a session's working directory and
    /// returns its absolute path. Directories it creates get `owner` (the
    /// user's own uid/gid in privileged sandbox mode).
    pub fn resolve(
        &self,
        user_id: &str,
        subdir: Option<&Subdir>,
        owner: Option<(u32, u32)>,
    ) -> Result<PathBuf, UserDirError> {
        shared::names::validate_user_id(user_id)
            .map_err(|source| UserDirError::InvalidName { field: "user_id", source })?;
        let mut path = self.base_path.join(user_id);
        let mut dir = self.open_child(&self.base_fd, user_id, "user_id", owner)?;
        for segment in subdir.into_iter().flat_map(Subdir::segments) {
            dir = self.open_child(&dir, segment, "subdir", owner)?;
            path.push(segment);
        }
        Ok(path)
    }

    /// Opens directory `name` beneath `parent`, creating it if allowed.
    fn open_child(
        &self,
        parent: &OwnedFd,
        name: &str,
        field: &'static str,
        owner: Option<(u32, u32)>,
    ) -> Result<OwnedFd, UserDirError> {
        let open = || {
            // No O_NOFOLLOW: with O_DIRECTORY it turns a symlink into ENOTDIR;
            // RESOLVE_NO_SYMLINKS refuses it (ELOOP) for what it is.
            rustix::fs::openat2(
                parent,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            )
        };
        let classify = |errno: rustix::io::Errno| match errno {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
                UserDirError::Escapes { field, component: name.to_owned() }
            }
            rustix::io::Errno::NOTDIR => UserDirError::NotADirectory { field, component: name.to_owned() },
            other => UserDirError::Io { component: name.to_owned(), source: other.into() },
        };
        match open() {
            Ok(fd) => Ok(fd),
            Err(rustix::io::Errno::NOENT) if self.auto_create => {
                match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) => {
                        if let Some((uid, gid)) = owner {
                            rustix::fs::chownat(
                                parent,
                                name,
                                Some(rustix::fs::Uid::from_raw(uid)),
                                Some(rustix::fs::Gid::from_raw(gid)),
                                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                            )
                            .map_err(classify)?;
                        }
                        open().map_err(classify)
                    }
                    // Created by a concurrent request.
                    Err(rustix::io::Errno::EXIST) => open().map_err(classify),
                    Err(errno) => Err(classify(errno)),
                }
            }
            Err(rustix::io::Errno::NOENT) => Err(UserDirError::Missing { field, component: name.to_owned() }),
            Err(errno) => Err(classify(errno)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(auto_create: bool) -> (tempfile::TempDir, UserDirs) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = UserDirs::open(tmp.path(), auto_create).expect("open base");
        (tmp, dirs)
    }

    #[test]
    fn creates_user_and_nested_subdirs_mode_0700() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, dirs) = dirs(true);
        let sub = Subdir::parse("a/b").expect("valid");
        let path = dirs.resolve("alice", Some(&sub), None).expect("resolve");
        assert_eq!(path, dirs.base_path().join("alice/a/b"));
        assert!(path.is_dir());
        let mode = std::fs::metadata(dirs.base_path().join("alice")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn symlinks_are_refused_even_inside_the_base() {
        let (_tmp, dirs) = dirs(true);
        dirs.resolve("alice", None, None).expect("alice");
        dirs.resolve("bob", None, None).expect("bob");
        std::os::unix::fs::symlink(dirs.base_path().join("bob"), dirs.base_path().join("alice/link")).expect("symlink");
        let sub = Subdir::parse("link").expect("valid");
        let result = dirs.resolve("alice", Some(&sub), None);
        assert!(matches!(result, Err(UserDirError::Escapes { field: "subdir", .. })), "{result:?}");
        std::os::unix::fs::symlink("/etc", dirs.base_path().join("mallory")).expect("symlink");
        assert!(matches!(dirs.resolve("mallory", None, None), Err(UserDirError::Escapes { field: "user_id", .. })));
    }

    #[test]
    fn files_and_missing_dirs_are_reported() {
        let (_tmp, dirs) = dirs(true);
        dirs.resolve("alice", None, None).expect("alice");
        std::fs::write(dirs.base_path().join("alice/file"), b"x").expect("write");
        let sub = Subdir::parse("file").expect("valid");
        assert!(matches!(dirs.resolve("alice", Some(&sub), None), Err(UserDirError::NotADirectory { .. })));

        let (_tmp2, strict) = super::tests::dirs(false);
        assert!(matches!(strict.resolve("carol", None, None), Err(UserDirError::Missing { field: "user_id", .. })));
    }
}
