//! SQLite backend: one file, WAL journal, migrations from `migrations/sqlite`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::sql::impl_sql_store;
use super::{StoreError, StoreResult};
use crate::config::StorageKind;

#[derive(Debug)]
pub struct SqliteStore {
    pool: sqlx::SqlitePool,
}

impl_sql_store!(SqliteStore, sqlx::Sqlite, StorageKind::Sqlite);

/// Bytes the WAL file is cut back to once a checkpoint emptied it.
pub const WAL_SIZE_LIMIT: u64 = 16 * 1024 * 1024;

pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", parent.display())))?;
    }
    // The database holds token hashes and every session's metadata: create it
    // readable by the server's user only (sqlx would follow the umask).
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    let options = SqliteConnectOptions::from_str("sqlite:")
        .map_err(StoreError::from)?
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        // The WAL file keeps its largest size after a checkpoint: one turn
        // with a 100 MB reply (stored twice, as the assistant message and
        // the result) left it at 200 MB for good. Cut back to this instead;
        // usual turns never grow it that far (checkpoints every 1,000
        // pages, 4 MB).
        .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string())
        // FULL: every commit reaches the disk before the API acknowledges it.
        // NORMAL loses the last commits when the OS crashes or the file
        // system aborts (measured: a user created with 201 was gone after
        // ext4 turned read-only, tests/tests/service.rs).
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
    Ok(SqliteStore { pool })
}
