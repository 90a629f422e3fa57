//! PostgreSQL backend: migrations from `migrations/postgres`, optionally in a
//! schema of their own (`session.pg_schema`), database created if missing.

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::sql::impl_sql_store;
use super::{StoreError, StoreResult};
use crate::config::StorageKind;

#[derive(Debug)]
pub struct PostgresStore {
    pool: sqlx::PgPool,
}

impl_sql_store!(PostgresStore, sqlx::Postgres, StorageKind::Postgresql);

/// SQLSTATE for "database does not exist".
const INVALID_CATALOG_NAME: &str = "3D000";

pub async fn open(url: &str, schema: Option<&str>, max_connections: u32) -> StoreResult<PostgresStore> {
    // Never echo the URL: it may carry a password.
    let mut options = PgConnectOptions::from_str(url)
        .map_err(|_| StoreError::Unavailable("session.database_url is not a valid PostgreSQL URL".into()))?;
    create_database_if_missing(&options).await?;
    if let Some(schema) = schema {
        // `schema` passed config validation ([A-Za-z0-9_-]), quoted anyway.
        let mut conn = options.connect().await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")).execute(&mut conn).await?;
        options = options.options([("search_path", schema)]);
    }
    let pool = PgPoolOptions::new()
        .min_connections(1)
        .max_connections(max_connections.max(2))
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    sqlx::migrate!("../migrations/postgres").run(&pool).await?;
    Ok(PostgresStore { pool })
}

/// The seed created its database on first start; so do we.
async fn create_database_if_missing(options: &PgConnectOptions) -> StoreResult<()> {
    let error = match options.connect().await {
        Ok(_) => return Ok(()),
        Err(error) => error,
    };
    let missing = matches!(&error, sqlx::Error::Database(db) if db.code().as_deref() == Some(INVALID_CATALOG_NAME));
    let Some(name) = options.get_database().filter(|_| missing) else {
        return Err(error.into());
    };
    let mut admin = options.clone().database("postgres").connect().await?;
    let quoted = name.replace('"', "\"\"");
    match sqlx::query(&format!("CREATE DATABASE \"{quoted}\"")).execute(&mut admin).await {
        Ok(_) => Ok(()),
        // Another instance created it first.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => Ok(()),
        Err(error) => Err(error.into()),
    }
}
