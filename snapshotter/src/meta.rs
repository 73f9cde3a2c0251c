//! The metadata database: one SQLite file per store root, shared by every backend.
//!
//! Tables:
//! * `snapshots` — one row per snapshot: numeric id (the backend's handle), key/name, kind,
//!   parent id, times, the usage recorded at commit, and a `broken` reason.
//! * `labels` — (snapshot id, name, value).
//! * `journal` — (operation, id, key) written before each backend operation and deleted by the
//!   transaction that records its result; the `key` column is unique, so an entry also
//!   reserves the key or name being created until the operation finishes.
//! * `meta` — the recorded backend and the id counter (ids are never reused).
//! * `images` — image name → top committed snapshot (version 2).
//! * `leases`, `lease_snapshots` — named holders with an optional expiry (version 2).
//! * `snapshots.diff_id`, `snapshots.chain_id` — for layers applied by `apply_layer`
//!   (version 3); `snapshots.content_digest`, `snapshots.tar_size` — the layer's content
//!   checksum and uncompressed size (version 4).
//! * `blobs` — the content store's index: digest, size, media type (version 5); the bytes
//!   live in `blobs/sha256/<hex>` under the root.
//! * `blob_holders` — (holder, digest): `image:<name>` or `lease:<name>` holds a blob; triggers
//!   drop an image's holds when it is deleted or pointed elsewhere, a lease's when it goes.
//!   `images.manifest` — the digest of the manifest an imported image came with (version 5).
//! * `spares` — storage a commit made for the next prepare on a layer (version 6);
//!   `snapshots.rebuildable` — storage recorded without a sync (version 7).
//! * `flats` — flattened lowers (version 8): storage `id` holding the merged content of the
//!   chain whose top is `top_id` (`depth` layers), with what it costs on disk; a trigger
//!   drops the row with its top snapshot's, and cleanup then reclaims the storage.
//!
//! The schema version is SQLite's `user_version`; [`MIGRATIONS`] brings an older database up
//! to date inside one transaction.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::backend::JournalOp;
use crate::error::{Error, Result};
use crate::filter::{Field, Filter, Op};
use crate::store::LeaseInfo;
use crate::types::{Info, Kind, Labels, Usage};

/// The database file's name inside the store root.
pub(crate) const DB_FILE: &str = "metadata.db";

/// On btrfs, makes SQLite's shared-memory file (`metadata.db-shm`, which SQLite maps into
/// memory) a no-copy-on-write file before SQLite opens it. Pages of a copy-on-write file
/// need new space each time they are written, so on a full btrfs a store to the mapping
/// would kill the process with SIGBUS instead of returning "disk full"; SQLite allocates the
/// pages with write(2) when it grows the file, and a no-COW file is rewritten in place. Best
/// effort: anything unexpected leaves SQLite to create the file as usual.
fn prepare_shm_on_btrfs(root: &Path, db: &Path) {
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let on_btrfs = rustix::fs::statfs(root).is_ok_and(|st| st.f_type as i64 == BTRFS_SUPER_MAGIC);
    if !on_btrfs {
        return;
    }
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    let Ok(fd) = rustix::fs::open(
        Path::new(&shm),
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o644),
    ) else {
        return;
    };
    // The flag only takes on an empty file; one in use by another process already has it.
    if rustix::fs::fstat(&fd).is_ok_and(|st| st.st_size == 0) {
        let flags = rustix::fs::ioctl_getflags(&fd).unwrap_or(rustix::fs::IFlags::empty());
        if let Err(e) = rustix::fs::ioctl_setflags(&fd, flags | rustix::fs::IFlags::NOCOW) {
            tracing::debug!(error = %e, "could not make the SQLite shm file no-COW");
        }
    }
}

/// Schema migrations; entry `i` moves a database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE snapshots (
    id         INTEGER PRIMARY KEY,
    key        TEXT NOT NULL UNIQUE,
    kind       INTEGER NOT NULL,
    parent_id  INTEGER REFERENCES snapshots(id),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size       INTEGER,
    inodes     INTEGER,
    volatile   INTEGER NOT NULL DEFAULT 0,
    broken     TEXT
);
CREATE INDEX snapshots_parent ON snapshots(parent_id);
CREATE INDEX snapshots_kind ON snapshots(kind);
CREATE TABLE labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, name)
) WITHOUT ROWID;
CREATE INDEX labels_name_value ON labels(name, value);
CREATE TABLE journal (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    op          TEXT NOT NULL,
    snapshot_id INTEGER NOT NULL,
    key         TEXT NOT NULL UNIQUE,
    parent_id   INTEGER,
    owner       TEXT NOT NULL,
    started_ns  INTEGER NOT NULL
);
CREATE INDEX journal_snapshot ON journal(snapshot_id);
CREATE INDEX journal_parent ON journal(parent_id);
INSERT INTO meta (name, value) VALUES ('next_id', '0');
"#,
    r#"
CREATE TABLE images (
    name        TEXT PRIMARY KEY,
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id),
    created_ns  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX images_snapshot ON images(snapshot_id);
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    expires_ns INTEGER
) WITHOUT ROWID;
CREATE TABLE lease_snapshots (
    lease       TEXT NOT NULL REFERENCES leases(name) ON DELETE CASCADE,
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id),
    PRIMARY KEY (lease, snapshot_id)
) WITHOUT ROWID;
CREATE INDEX lease_snapshots_snapshot ON lease_snapshots(snapshot_id);
"#,
    r#"
ALTER TABLE snapshots ADD COLUMN diff_id TEXT;
ALTER TABLE snapshots ADD COLUMN chain_id TEXT;
"#,
    r#"
ALTER TABLE snapshots ADD COLUMN content_digest TEXT;
ALTER TABLE snapshots ADD COLUMN tar_size INTEGER;
"#,
    r#"
CREATE TABLE blobs (
    digest     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    created_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE blob_holders (
    holder TEXT NOT NULL,
    digest TEXT NOT NULL REFERENCES blobs(digest) ON DELETE CASCADE,
    PRIMARY KEY (holder, digest)
) WITHOUT ROWID;
CREATE INDEX blob_holders_digest ON blob_holders(digest);
ALTER TABLE images ADD COLUMN manifest TEXT;
CREATE TRIGGER images_release_blobs AFTER DELETE ON images BEGIN
    DELETE FROM blob_holders WHERE holder = 'image:' || OLD.name;
END;
CREATE TRIGGER images_retarget AFTER UPDATE OF snapshot_id ON images
    WHEN OLD.snapshot_id != NEW.snapshot_id BEGIN
    DELETE FROM blob_holders WHERE holder = 'image:' || OLD.name;
    UPDATE images SET manifest = NULL WHERE name = NEW.name;
END;
CREATE TRIGGER leases_release_blobs AFTER DELETE ON leases BEGIN
    DELETE FROM blob_holders WHERE holder = 'lease:' || OLD.name;
END;
"#,
    r#"
CREATE TABLE spares (
    id         INTEGER PRIMARY KEY,
    parent_id  INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE INDEX spares_parent ON spares(parent_id);
CREATE TRIGGER snapshots_drop_spares AFTER DELETE ON snapshots BEGIN
    DELETE FROM spares WHERE parent_id = OLD.id;
END;
"#,
    r#"
ALTER TABLE snapshots ADD COLUMN rebuildable INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
CREATE TABLE flats (
    id         INTEGER PRIMARY KEY,
    top_id     INTEGER NOT NULL UNIQUE,
    depth      INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    inodes     INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TRIGGER snapshots_drop_flats AFTER DELETE ON snapshots BEGIN
    DELETE FROM flats WHERE top_id = OLD.id;
END;
"#,
];

/// What is recorded of a layer applied by `apply_layer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// The chainID: the layer's identity with everything below it.
    pub chain_id: String,
    /// The content checksum of the change set (`strata::layer::content`).
    pub content: String,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
}

/// A flattened lower, as `flats` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flat {
    /// Its storage id.
    pub id: u64,
    /// The top snapshot of the chain it merges.
    pub top: u64,
    /// How many layers it merges.
    pub depth: usize,
    /// What it costs on disk beyond the layers it links to.
    pub usage: Usage,
}

/// One row of `snapshots`, with what the store needs besides the Info.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub id: u64,
    pub key: String,
    pub kind: Kind,
    pub parent_id: Option<u64>,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub usage: Option<Usage>,
    pub volatile: bool,
    pub broken: Option<String>,
    /// The storage was recorded without a sync and holds nothing that cannot be made again
    /// from this row (see [`crate::backend::Backend::is_fresh`]): a power loss may take it,
    /// recovery rebuilds it.
    pub rebuildable: bool,
}

/// One journal entry.
#[derive(Debug, Clone)]
pub(crate) struct JournalEntry {
    pub seq: i64,
    pub op: JournalOp,
    pub id: u64,
    pub key: String,
    pub owner: String,
}

/// The open database.
pub(crate) struct Meta {
    conn: Connection,
    path: PathBuf,
    root: PathBuf,
    parents: RefCell<ParentCache>,
}

/// `(id, parent)` of a committed snapshot.
type ParentOf = (u64, Option<u64>);

/// The parent of every committed snapshot this process has read a chain through.
///
/// Reading a parent chain from SQL costs one index lookup per layer, which made `prepare`
/// slower with depth. A committed snapshot's parent never changes and its id is never given
/// to another snapshot once the row that used it is committed, so what was read in a committed
/// transaction stays true for as long as the id exists; chains are only read from existing
/// rows. Entries learned in a write transaction count only once it commits: a rolled-back
/// transaction gives its ids out again.
#[derive(Default)]
struct ParentCache {
    parent: HashMap<u64, Option<u64>>,
}

impl ParentCache {
    /// Past this many entries the cache starts over (16 bytes each: about 16 MiB).
    const MAX: usize = 1 << 20;

    fn learn(&mut self, pairs: impl IntoIterator<Item = ParentOf>) {
        if self.parent.len() >= Self::MAX {
            self.parent.clear();
        }
        self.parent.extend(pairs);
    }
}

pub(crate) fn to_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_ns(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

fn id_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn db_id(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

/// How many columns [`ROW_COLUMNS`] lists: a query's own columns come after them.
const ROW_COLUMN_COUNT: usize = 11;

const ROW_COLUMNS: &str =
    "s.id, s.key, s.kind, s.parent_id, s.created_ns, s.updated_ns, s.size, s.inodes, s.volatile, s.broken, s.rebuildable";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let kind: i64 = r.get(2)?;
    let size: Option<i64> = r.get(6)?;
    let inodes: Option<i64> = r.get(7)?;
    Ok(Row {
        id: id_of(r.get(0)?),
        key: r.get(1)?,
        kind: Kind::from_db(kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                2,
                rusqlite::types::Type::Integer,
                format!("unknown kind {kind}").into(),
            )
        })?,
        parent_id: r.get::<_, Option<i64>>(3)?.map(id_of),
        created: from_ns(r.get(4)?),
        updated: from_ns(r.get(5)?),
        usage: match (size, inodes) {
            (Some(s), Some(i)) => Some(Usage {
                size: id_of(s),
                inodes: id_of(i),
            }),
            _ => None,
        },
        volatile: r.get::<_, i64>(8)? != 0,
        broken: r.get(9)?,
        rebuildable: r.get::<_, i64>(10)? != 0,
    })
}

impl Meta {
    /// Opens (creating and migrating as needed) the database of `root`.
    pub fn open(root: &Path, lock_timeout: Duration) -> Result<Meta> {
        let path = root.join(DB_FILE);
        prepare_shm_on_btrfs(root, &path);
        let conn = Connection::open(&path).map_err(|e| Error::Metadata {
            path: path.clone(),
            context: "open".into(),
            source: e,
        })?;
        let mut meta = Meta {
            conn,
            path,
            root: root.to_path_buf(),
            parents: RefCell::default(),
        };
        meta.conn
            .busy_timeout(lock_timeout)
            .map_err(|e| meta.err("set the busy timeout", e))?;
        // WAL lets readers run beside a writer and keeps transactions ordered on disk: after a
        // power loss a prefix of them survives. synchronous=NORMAL does not fsync each commit;
        // durability of storage is ordered by the backends syncing before the commit.
        meta.conn
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| meta.err("enable WAL", e))?;
        meta.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| meta.err("set synchronous", e))?;
        meta.conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| meta.err("enable foreign keys", e))?;
        meta.migrate()?;
        Ok(meta)
    }

    fn err(&self, context: &str, e: rusqlite::Error) -> Error {
        wrap(&self.path, &self.root, context, e)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| self.err("read the schema version", e))?;
        let latest = MIGRATIONS.len() as i64;
        if version > latest {
            return Err(Error::Schema {
                path: self.path.clone(),
                reason: format!(
                    "schema version {version} was written by a newer strata (this one knows up to {latest}); upgrade strata"
                ),
            });
        }
        if version == latest {
            return Ok(());
        }
        let path = self.path.clone();
        let root = self.root.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| wrap(&path, &root, "start the migration", e))?;
        // Another process may have migrated while we waited for the write lock.
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| wrap(&path, &root, "read the schema version", e))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.execute_batch(sql)
                .map_err(|e| wrap(&path, &root, &format!("migrate to version {}", i + 1), e))?;
        }
        tx.pragma_update(None, "user_version", latest)
            .map_err(|e| wrap(&path, &root, "record the schema version", e))?;
        tx.commit()
            .map_err(|e| wrap(&path, &root, "commit the migration", e))
    }

    /// Starts a write transaction (taking SQLite's write lock at once, waiting up to the lock
    /// timeout), on behalf of `key`.
    pub fn write(&mut self, key: &str) -> Result<Tx<'_>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| wrap_key(&self.path, &self.root, key, "start a transaction", e))?;
        Ok(Tx {
            tx,
            path: &self.path,
            root: &self.root,
            key: key.to_string(),
            parents: &self.parents,
            learned: Some(RefCell::default()),
        })
    }

    /// Starts a read transaction (a consistent snapshot of the database).
    pub fn read(&mut self, key: &str) -> Result<Tx<'_>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(|e| wrap_key(&self.path, &self.root, key, "start a transaction", e))?;
        Ok(Tx {
            tx,
            path: &self.path,
            root: &self.root,
            key: key.to_string(),
            parents: &self.parents,
            learned: None,
        })
    }
}

fn wrap(path: &Path, root: &Path, context: &str, e: rusqlite::Error) -> Error {
    wrap_key(path, root, "", context, e)
}

fn wrap_key(path: &Path, root: &Path, key: &str, context: &str, e: rusqlite::Error) -> Error {
    if let rusqlite::Error::SqliteFailure(f, _) = &e {
        if matches!(
            f.code,
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
        ) {
            return Error::Busy {
                key: key.to_string(),
                root: root.to_path_buf(),
            };
        }
    }
    Error::Metadata {
        path: path.to_path_buf(),
        context: if key.is_empty() {
            context.to_string()
        } else {
            format!("{context} for {key:?}")
        },
        source: e,
    }
}

/// A transaction with the queries the store needs. Dropping it without [`Tx::commit`] rolls
/// back.
pub(crate) struct Tx<'a> {
    tx: Transaction<'a>,
    path: &'a Path,
    root: &'a Path,
    key: String,
    parents: &'a RefCell<ParentCache>,
    /// In a write transaction: parents read, for the cache once it commits.
    learned: Option<RefCell<Vec<ParentOf>>>,
}

impl Tx<'_> {
    fn e(&self, context: &str, e: rusqlite::Error) -> Error {
        wrap_key(self.path, self.root, &self.key, context, e)
    }

    /// Commits the transaction.
    pub fn commit(self) -> Result<()> {
        let (path, root, key) = (self.path, self.root, self.key.clone());
        let (parents, learned) = (self.parents, self.learned);
        self.tx
            .commit()
            .map_err(|e| wrap_key(path, root, &key, "commit the transaction", e))?;
        if let Some(learned) = learned {
            parents.borrow_mut().learn(learned.into_inner());
        }
        Ok(())
    }

    /// A value of the `meta` table.
    pub fn meta_value(&self, name: &str) -> Result<Option<String>> {
        self.tx
            .prepare_cached("SELECT value FROM meta WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)).optional())
            .map_err(|e| self.e("read meta", e))
    }

    /// Sets a value of the `meta` table.
    pub fn set_meta_value(&self, name: &str, value: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO meta (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute([name, value]))
            .map(|_| ())
            .map_err(|e| self.e("write meta", e))
    }

    /// Allocates a new snapshot id; ids are never reused.
    pub fn next_id(&self) -> Result<u64> {
        self.tx
            .prepare_cached(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'next_id'
                 RETURNING CAST(value AS INTEGER)",
            )
            .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
            .map(id_of)
            .map_err(|e| self.e("allocate an id", e))
    }

    /// The row with this key or name.
    pub fn row_by_key(&self, key: &str) -> Result<Option<Row>> {
        self.tx
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM snapshots s WHERE s.key = ?1"
            ))
            .and_then(|mut s| s.query_row([key], read_row).optional())
            .map_err(|e| self.e("look up", e))
    }

    /// The row with this key or name, or else the top snapshot of the image with this name.
    pub fn row_by_key_or_image(&self, key: &str) -> Result<Option<Row>> {
        match self.row_by_key(key)? {
            Some(row) => Ok(Some(row)),
            None => match self.image(key)? {
                Some(id) => self.row_by_id(id),
                None => Ok(None),
            },
        }
    }

    /// The row with this id.
    pub fn row_by_id(&self, id: u64) -> Result<Option<Row>> {
        self.tx
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM snapshots s WHERE s.id = ?1"
            ))
            .and_then(|mut s| s.query_row([db_id(id)], read_row).optional())
            .map_err(|e| self.e("look up by id", e))
    }

    /// The key of the row with this id.
    pub fn key_of(&self, id: u64) -> Result<Option<String>> {
        self.tx
            .prepare_cached("SELECT key FROM snapshots WHERE id = ?1")
            .and_then(|mut s| s.query_row([db_id(id)], |r| r.get(0)).optional())
            .map_err(|e| self.e("look up a parent", e))
    }

    /// The parent chain of `parent_id` (itself first, then its parent, ...).
    pub fn chain(&self, parent_id: Option<u64>) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut next = parent_id;
        // The usual miss is the chain's newest layer (just committed): look it up alone, then
        // follow the cache; a second miss in a row reads the rest in one query.
        let mut missed = false;
        while let Some(id) = next {
            let cached = self.parents.borrow().parent.get(&id).copied();
            match cached {
                Some(parent) => {
                    ids.push(id);
                    next = parent;
                    missed = false;
                }
                None if !missed => {
                    let Some(parent) = self.parent_of(id)? else {
                        return Ok(ids);
                    };
                    self.remember([(id, parent)]);
                    ids.push(id);
                    next = parent;
                    missed = true;
                }
                None => break,
            }
        }
        let Some(start) = next else {
            return Ok(ids);
        };
        let mut stmt = self
            .tx
            .prepare_cached(
                "WITH RECURSIVE chain(id, parent_id, depth) AS (
                     SELECT id, parent_id, 0 FROM snapshots WHERE id = ?1
                     UNION ALL
                     SELECT s.id, s.parent_id, c.depth + 1
                     FROM snapshots s JOIN chain c ON s.id = c.parent_id
                 )
                 SELECT id, parent_id FROM chain ORDER BY depth",
            )
            .map_err(|e| self.e("read the parent chain", e))?;
        let rest = stmt
            .query_map([db_id(start)], |r| {
                Ok((id_of(r.get(0)?), r.get::<_, Option<i64>>(1)?.map(id_of)))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("read the parent chain", e))?;
        ids.extend(rest.iter().map(|(id, _)| *id));
        self.remember(rest);
        Ok(ids)
    }

    /// The parent of the row `id`: `None` when there is no such row, `Some(None)` for a
    /// parentless one.
    fn parent_of(&self, id: u64) -> Result<Option<Option<u64>>> {
        self.tx
            .prepare_cached("SELECT parent_id FROM snapshots WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([db_id(id)], |r| r.get::<_, Option<i64>>(0))
                    .optional()
            })
            .map(|p| p.map(|p| p.map(id_of)))
            .map_err(|e| self.e("read the parent chain", e))
    }

    /// Adds parents read in this transaction to the cache (at commit, in a write one).
    fn remember(&self, pairs: impl IntoIterator<Item = ParentOf>) {
        match &self.learned {
            Some(learned) => learned.borrow_mut().extend(pairs),
            None => self.parents.borrow_mut().learn(pairs),
        }
    }

    /// Whether a key or name is taken by a row or reserved by a journal entry.
    pub fn key_taken(&self, key: &str) -> Result<bool> {
        self.tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM snapshots WHERE key = ?1)
                     OR EXISTS (SELECT 1 FROM journal WHERE key = ?1)",
            )
            .and_then(|mut s| s.query_row([key], |r| r.get(0)))
            .map_err(|e| self.e("check the key", e))
    }

    /// Whether the snapshot has children, counting snapshots being created on it.
    pub fn has_children(&self, id: u64) -> Result<bool> {
        self.tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM snapshots WHERE parent_id = ?1)
                     OR EXISTS (SELECT 1 FROM journal WHERE parent_id = ?1 AND op = 'create')",
            )
            .and_then(|mut s| s.query_row([db_id(id)], |r| r.get(0)))
            .map_err(|e| self.e("check for children", e))
    }

    /// The journal entry in flight for snapshot `id`, if any.
    pub fn pending_op(&self, id: u64) -> Result<Option<JournalOp>> {
        let op: Option<String> = self
            .tx
            .prepare_cached("SELECT op FROM journal WHERE snapshot_id = ?1 LIMIT 1")
            .and_then(|mut s| s.query_row([db_id(id)], |r| r.get(0)).optional())
            .map_err(|e| self.e("read the journal", e))?;
        Ok(op.as_deref().and_then(JournalOp::parse))
    }

    /// Writes a journal entry; returns its sequence number.
    pub fn journal_add(
        &self,
        op: JournalOp,
        id: u64,
        key: &str,
        parent_id: Option<u64>,
        owner: &str,
    ) -> Result<i64> {
        self.tx
            .prepare_cached(
                "INSERT INTO journal (op, snapshot_id, key, parent_id, owner, started_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    op.as_str(),
                    db_id(id),
                    key,
                    parent_id.map(db_id),
                    owner,
                    to_ns(SystemTime::now())
                ])
            })
            .map_err(|e| self.e("write the journal", e))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Deletes a journal entry.
    pub fn journal_remove(&self, seq: i64) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM journal WHERE seq = ?1")
            .and_then(|mut s| s.execute([seq]))
            .map(|_| ())
            .map_err(|e| self.e("clear the journal", e))
    }

    /// Every journal entry.
    pub fn journal(&self) -> Result<Vec<JournalEntry>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT seq, op, snapshot_id, key, owner FROM journal ORDER BY seq")
            .map_err(|e| self.e("read the journal", e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    id_of(r.get(2)?),
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("read the journal", e))?;
        Ok(rows
            .into_iter()
            .filter_map(|(seq, op, id, key, owner)| {
                Some(JournalEntry {
                    seq,
                    op: JournalOp::parse(&op)?,
                    id,
                    key,
                    owner,
                })
            })
            .collect())
    }

    /// Inserts a snapshot row and its labels.
    pub fn insert(&self, row: &Row, labels: &Labels) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO snapshots
                     (id, key, kind, parent_id, created_ns, updated_ns, volatile, rebuildable)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    db_id(row.id),
                    row.key,
                    row.kind.to_db(),
                    row.parent_id.map(db_id),
                    to_ns(row.created),
                    to_ns(row.updated),
                    i64::from(row.volatile),
                    i64::from(row.rebuildable),
                ])
            })
            .map_err(|e| self.e("insert", e))?;
        self.insert_labels(row.id, labels)
    }

    fn insert_labels(&self, id: u64, labels: &Labels) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let mut stmt = self
            .tx
            .prepare_cached("INSERT INTO labels (snapshot_id, name, value) VALUES (?1, ?2, ?3)")
            .map_err(|e| self.e("write labels", e))?;
        for (k, v) in labels {
            stmt.execute(params![db_id(id), k, v])
                .map_err(|e| self.e("write labels", e))?;
        }
        Ok(())
    }

    /// Replaces every label of `id`.
    pub fn replace_labels(&self, id: u64, labels: &Labels) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM labels WHERE snapshot_id = ?1")
            .and_then(|mut s| s.execute([db_id(id)]))
            .map_err(|e| self.e("clear labels", e))?;
        self.insert_labels(id, labels)
    }

    /// The labels of `id`.
    pub fn labels(&self, id: u64) -> Result<Labels> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT name, value FROM labels WHERE snapshot_id = ?1")
            .map_err(|e| self.e("read labels", e))?;
        let labels = stmt
            .query_map([db_id(id)], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<Labels>>())
            .map_err(|e| self.e("read labels", e))?;
        Ok(labels)
    }

    /// Turns row `id` into the Committed snapshot `name`. As in containerd, a committed
    /// snapshot is created when it is committed: created and updated are both set to now.
    pub fn mark_committed(
        &self,
        id: u64,
        name: &str,
        usage: Usage,
        rebuildable: bool,
    ) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE snapshots SET key = ?2, kind = ?3, created_ns = ?4, updated_ns = ?4,
                     size = ?5, inodes = ?6, rebuildable = ?7
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    db_id(id),
                    name,
                    Kind::Committed.to_db(),
                    to_ns(SystemTime::now()),
                    i64::try_from(usage.size).unwrap_or(i64::MAX),
                    i64::try_from(usage.inodes).unwrap_or(i64::MAX),
                    i64::from(rebuildable),
                ])
            })
            .map(|_| ())
            .map_err(|e| self.e("record the commit", e))
    }

    /// Sets the updated time of `id`.
    pub fn touch(&self, id: u64, when: SystemTime) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE snapshots SET updated_ns = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![db_id(id), to_ns(when)]))
            .map(|_| ())
            .map_err(|e| self.e("update", e))
    }

    /// Records why the snapshot is broken.
    pub fn mark_broken(&self, id: u64, reason: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE snapshots SET broken = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![db_id(id), reason]))
            .map(|_| ())
            .map_err(|e| self.e("mark broken", e))
    }

    /// Records `id` as a spare of the committed snapshot `parent`: storage a backend made at
    /// the commit, for the next Active child of `parent` to take.
    pub fn spare_add(&self, id: u64, parent: u64, now: SystemTime) -> Result<()> {
        self.tx
            .prepare_cached("INSERT INTO spares (id, parent_id, created_ns) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![db_id(id), db_id(parent), to_ns(now)]))
            .map(|_| ())
            .map_err(|e| self.e("record a spare", e))
    }

    /// Takes (deletes and returns) a spare of `parent`, if it has one.
    pub fn spare_take(&self, parent: u64) -> Result<Option<u64>> {
        self.tx
            .prepare_cached(
                "DELETE FROM spares WHERE id = (SELECT min(id) FROM spares WHERE parent_id = ?1)
                 RETURNING id",
            )
            .and_then(|mut s| {
                s.query_row([db_id(parent)], |r| r.get::<_, i64>(0))
                    .optional()
            })
            .map(|id| id.map(id_of))
            .map_err(|e| self.e("take a spare", e))
    }

    /// Every spare.
    pub fn all_spares(&self) -> Result<Vec<u64>> {
        self.tx
            .prepare_cached("SELECT id FROM spares ORDER BY id")
            .and_then(|mut s| {
                s.query_map([], |r| r.get::<_, i64>(0))?
                    .map(|r| r.map(id_of))
                    .collect()
            })
            .map_err(|e| self.e("list spares", e))
    }

    /// Forgets spare `id` (its storage is then reclaimed by cleanup, if any).
    pub fn spare_drop(&self, id: u64) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM spares WHERE id = ?1")
            .and_then(|mut s| s.execute([db_id(id)]))
            .map(|_| ())
            .map_err(|e| self.e("drop a spare", e))
    }

    /// The spares of `parent`.
    pub fn spares_of(&self, parent: u64) -> Result<Vec<u64>> {
        self.tx
            .prepare_cached("SELECT id FROM spares WHERE parent_id = ?1 ORDER BY id")
            .and_then(|mut s| {
                s.query_map([db_id(parent)], |r| r.get::<_, i64>(0))?
                    .map(|r| r.map(id_of))
                    .collect()
            })
            .map_err(|e| self.e("list spares", e))
    }

    /// Records storage `id` as the flattened lower of the chain topped by `top`. Returns
    /// false, recording nothing, when that chain has one already (another process built it).
    pub fn flat_add(&self, flat: &Flat, now: SystemTime) -> Result<bool> {
        self.tx
            .prepare_cached(
                "INSERT INTO flats (id, top_id, depth, size, inodes, created_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (top_id) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    db_id(flat.id),
                    db_id(flat.top),
                    i64::try_from(flat.depth).unwrap_or(i64::MAX),
                    i64::try_from(flat.usage.size).unwrap_or(i64::MAX),
                    i64::try_from(flat.usage.inodes).unwrap_or(i64::MAX),
                    to_ns(now)
                ])
            })
            .map(|n| n == 1)
            .map_err(|e| self.e("record a flattened lower", e))
    }

    /// The flattened lower of the chain topped by `top`, if it has one.
    pub fn flat_of(&self, top: u64) -> Result<Option<u64>> {
        self.tx
            .prepare_cached("SELECT id FROM flats WHERE top_id = ?1")
            .and_then(|mut s| s.query_row([db_id(top)], |r| r.get::<_, i64>(0)).optional())
            .map(|id| id.map(id_of))
            .map_err(|e| self.e("look up a flattened lower", e))
    }

    /// Every flattened lower.
    pub fn all_flats(&self) -> Result<Vec<Flat>> {
        self.tx
            .prepare_cached("SELECT id, top_id, depth, size, inodes FROM flats ORDER BY id")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(Flat {
                        id: id_of(r.get(0)?),
                        top: id_of(r.get(1)?),
                        depth: usize::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                        usage: Usage {
                            size: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                            inodes: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                        },
                    })
                })?
                .collect()
            })
            .map_err(|e| self.e("list flattened lowers", e))
    }

    /// Forgets flattened lower `id` (its storage is then reclaimed by cleanup, if any).
    pub fn flat_drop(&self, id: u64) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM flats WHERE id = ?1")
            .and_then(|mut s| s.execute([db_id(id)]))
            .map(|_| ())
            .map_err(|e| self.e("drop a flattened lower", e))
    }

    /// Deletes row `id`, its labels and its entries in (expired) leases. Its spares go with
    /// it (a trigger); their storage is then unknown, so cleanup reclaims it.
    pub fn delete(&self, id: u64) -> Result<()> {
        self.lease_drop_everywhere(id)?;
        self.tx
            .prepare_cached("DELETE FROM snapshots WHERE id = ?1")
            .and_then(|mut s| s.execute([db_id(id)]))
            .map(|_| ())
            .map_err(|e| self.e("delete", e))
    }

    /// Why `id` must not be deleted: the first image naming it or unexpired lease holding
    /// it, as "image X" / "lease Y"; `None` when nothing holds it.
    pub fn holder(&self, id: u64, now: SystemTime) -> Result<Option<String>> {
        let image: Option<String> = self
            .tx
            .prepare_cached("SELECT name FROM images WHERE snapshot_id = ?1 ORDER BY name LIMIT 1")
            .and_then(|mut s| s.query_row([db_id(id)], |r| r.get(0)).optional())
            .map_err(|e| self.e("look up images", e))?;
        if let Some(i) = image {
            return Ok(Some(format!("image {i:?}")));
        }
        let lease: Option<String> = self
            .tx
            .prepare_cached(
                "SELECT l.name FROM lease_snapshots ls JOIN leases l ON l.name = ls.lease
                 WHERE ls.snapshot_id = ?1 AND (l.expires_ns IS NULL OR l.expires_ns > ?2)
                 ORDER BY l.name LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![db_id(id), to_ns(now)], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.e("look up leases", e))?;
        Ok(lease.map(|l| format!("lease {l:?}")))
    }

    /// The snapshot an image names.
    pub fn image(&self, name: &str) -> Result<Option<u64>> {
        self.tx
            .prepare_cached("SELECT snapshot_id FROM images WHERE name = ?1")
            .and_then(|mut s| s.query_row([name], |r| r.get::<_, i64>(0)).optional())
            .map(|o| o.map(id_of))
            .map_err(|e| self.e("look up the image", e))
    }

    /// Points image `name` at snapshot `id` (replacing an older target).
    pub fn set_image(&self, name: &str, id: u64) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO images (name, snapshot_id, created_ns) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET snapshot_id = excluded.snapshot_id",
            )
            .and_then(|mut s| s.execute(params![name, db_id(id), to_ns(SystemTime::now())]))
            .map(|_| ())
            .map_err(|e| self.e("tag", e))
    }

    /// Deletes image `name`; false when there was none.
    pub fn delete_image(&self, name: &str) -> Result<bool> {
        self.tx
            .prepare_cached("DELETE FROM images WHERE name = ?1")
            .and_then(|mut s| s.execute([name]))
            .map(|n| n > 0)
            .map_err(|e| self.e("untag", e))
    }

    /// Every image with the name of its snapshot, by name.
    pub fn images(&self) -> Result<Vec<(String, String)>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT i.name, s.key FROM images i JOIN snapshots s ON s.id = i.snapshot_id
                 ORDER BY i.name",
            )
            .map_err(|e| self.e("list images", e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("list images", e))?;
        Ok(rows)
    }

    /// Creates lease `name`; false when it exists already.
    pub fn create_lease(&self, name: &str, expires: Option<SystemTime>) -> Result<bool> {
        self.tx
            .prepare_cached(
                "INSERT INTO leases (name, created_ns, expires_ns) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![name, to_ns(SystemTime::now()), expires.map(to_ns)])
            })
            .map(|n| n > 0)
            .map_err(|e| self.e("create the lease", e))
    }

    /// Lease `name`'s expiry: `None` when there is no such lease, `Some(None)` when it never
    /// expires.
    pub fn lease_expiry(&self, name: &str) -> Result<Option<Option<SystemTime>>> {
        self.tx
            .prepare_cached("SELECT expires_ns FROM leases WHERE name = ?1")
            .and_then(|mut s| {
                s.query_row([name], |r| r.get::<_, Option<i64>>(0))
                    .optional()
            })
            .map(|e| e.map(|ns| ns.map(from_ns)))
            .map_err(|e| self.e("look up the lease", e))
    }

    /// Whether lease `name` exists (expired or not).
    pub fn lease_exists(&self, name: &str) -> Result<bool> {
        self.tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM leases WHERE name = ?1)")
            .and_then(|mut s| s.query_row([name], |r| r.get(0)))
            .map_err(|e| self.e("look up the lease", e))
    }

    /// Adds snapshot `id` to lease `name`.
    pub fn lease_add(&self, name: &str, id: u64) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO lease_snapshots (lease, snapshot_id) VALUES (?1, ?2)
                 ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![name, db_id(id)]))
            .map(|_| ())
            .map_err(|e| self.e("add to the lease", e))
    }

    /// Takes snapshot `id` out of every lease that holds it.
    pub fn lease_drop_everywhere(&self, id: u64) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM lease_snapshots WHERE snapshot_id = ?1")
            .and_then(|mut s| s.execute([db_id(id)]))
            .map(|_| ())
            .map_err(|e| self.e("take a snapshot out of its leases", e))
    }

    /// Takes snapshot `id` out of lease `name` (nothing when it was not in it).
    pub fn lease_drop(&self, name: &str, id: u64) -> Result<()> {
        self.tx
            .prepare_cached("DELETE FROM lease_snapshots WHERE lease = ?1 AND snapshot_id = ?2")
            .and_then(|mut s| s.execute(params![name, db_id(id)]))
            .map(|_| ())
            .map_err(|e| self.e("take a snapshot out of the lease", e))
    }

    /// Deletes lease `name`; false when there was none.
    pub fn delete_lease(&self, name: &str) -> Result<bool> {
        self.tx
            .prepare_cached("DELETE FROM leases WHERE name = ?1")
            .and_then(|mut s| s.execute([name]))
            .map(|n| n > 0)
            .map_err(|e| self.e("remove the lease", e))
    }

    /// Every lease: name, expiry, and the names of the snapshots it holds.
    pub fn leases(&self) -> Result<Vec<LeaseInfo>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT name, expires_ns FROM leases ORDER BY name")
            .map_err(|e| self.e("list leases", e))?;
        let leases = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("list leases", e))?;
        let mut held = self
            .tx
            .prepare_cached(
                "SELECT s.key FROM lease_snapshots ls JOIN snapshots s ON s.id = ls.snapshot_id
                 WHERE ls.lease = ?1 ORDER BY s.key",
            )
            .map_err(|e| self.e("list leases", e))?;
        let mut out = Vec::new();
        for (name, exp) in leases {
            let keys = held
                .query_map([&name], |r| r.get::<_, String>(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(|e| self.e("list leases", e))?;
            out.push(LeaseInfo {
                name,
                expires: exp.map(from_ns),
                snapshots: keys,
            });
        }
        Ok(out)
    }

    /// Deletes leases that expired before `now`; returns their names.
    pub fn delete_expired_leases(&self, now: SystemTime) -> Result<Vec<String>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "DELETE FROM leases WHERE expires_ns IS NOT NULL AND expires_ns <= ?1
                 RETURNING name",
            )
            .map_err(|e| self.e("expire leases", e))?;
        let names = stmt
            .query_map([to_ns(now)], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("expire leases", e))?;
        Ok(names)
    }

    /// Committed snapshots that no gc root reaches, as (id, name), children before parents.
    ///
    /// Roots: images, unexpired leases, Active and View snapshots, snapshots labelled
    /// `containerd.io/gc.root`, and the parents of creates in flight; each holds its whole
    /// parent chain.
    pub fn unreachable(&self, now: SystemTime) -> Result<Vec<(u64, String)>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "WITH RECURSIVE
                 roots(id) AS (
                     SELECT snapshot_id FROM images
                     UNION SELECT ls.snapshot_id FROM lease_snapshots ls
                         JOIN leases l ON l.name = ls.lease
                         WHERE l.expires_ns IS NULL OR l.expires_ns > ?1
                     UNION SELECT id FROM snapshots WHERE kind != ?2
                     UNION SELECT snapshot_id FROM labels WHERE name = 'containerd.io/gc.root'
                     UNION SELECT parent_id FROM journal WHERE parent_id IS NOT NULL
                     UNION SELECT snapshot_id FROM journal
                 ),
                 live(id) AS (
                     SELECT id FROM roots
                     UNION SELECT s.parent_id FROM snapshots s JOIN live ON s.id = live.id
                         WHERE s.parent_id IS NOT NULL
                 )
                 SELECT id, key FROM snapshots
                 WHERE kind = ?2 AND id NOT IN (SELECT id FROM live)
                 ORDER BY id DESC",
            )
            .map_err(|e| self.e("find unreachable snapshots", e))?;
        let rows = stmt
            .query_map(params![to_ns(now), Kind::Committed.to_db()], |r| {
                Ok((id_of(r.get(0)?), r.get::<_, String>(1)?))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("find unreachable snapshots", e))?;
        Ok(rows)
    }

    /// Records the layer identity of snapshot `id`.
    pub fn set_layer(&self, id: u64, layer: &LayerRecord) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE snapshots SET diff_id = ?2, chain_id = ?3, content_digest = ?4, tar_size = ?5 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    db_id(id),
                    layer.diff_id,
                    layer.chain_id,
                    layer.content,
                    i64::try_from(layer.tar_size).unwrap_or(i64::MAX)
                ])
            })
            .map(|_| ())
            .map_err(|e| self.e("record the layer's digests", e))
    }

    /// What is recorded of snapshot `id` as a layer, when it was made by `apply_layer`.
    pub fn layer(&self, id: u64) -> Result<Option<LayerRecord>> {
        self.tx
            .prepare_cached(
                "SELECT diff_id, chain_id, content_digest, tar_size FROM snapshots WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([db_id(id)], |r| {
                    let diff_id: Option<String> = r.get(0)?;
                    let chain_id: Option<String> = r.get(1)?;
                    let content: Option<String> = r.get(2)?;
                    let size: Option<i64> = r.get(3)?;
                    Ok(match (diff_id, chain_id) {
                        (Some(diff_id), Some(chain_id)) => Some(LayerRecord {
                            diff_id,
                            chain_id,
                            content: content.unwrap_or_default(),
                            tar_size: size.map_or(0, |s| u64::try_from(s).unwrap_or(0)),
                        }),
                        _ => None,
                    })
                })
            })
            .map_err(|e| self.e("read the layer's digests", e))
    }

    /// Records blob `digest` (idempotent) and that `holder` holds it.
    pub fn add_blob(&self, digest: &str, size: u64, media_type: &str, holder: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO blobs (digest, size, media_type, created_ns) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (digest) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    digest,
                    i64::try_from(size).unwrap_or(i64::MAX),
                    media_type,
                    to_ns(SystemTime::now())
                ])
            })
            .and_then(|_| {
                self.tx
                    .prepare_cached(
                        "INSERT INTO blob_holders (holder, digest) VALUES (?1, ?2)
                         ON CONFLICT DO NOTHING",
                    )
                    .and_then(|mut s| s.execute(params![holder, digest]))
            })
            .map(|_| ())
            .map_err(|e| self.e("record a blob", e))
    }

    /// Size and media type of blob `digest`, when the content store has it.
    pub fn blob(&self, digest: &str) -> Result<Option<(u64, String)>> {
        self.tx
            .prepare_cached("SELECT size, media_type FROM blobs WHERE digest = ?1")
            .and_then(|mut s| {
                s.query_row([digest], |r| {
                    Ok((u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), r.get(1)?))
                })
                .optional()
            })
            .map_err(|e| self.e("look up a blob", e))
    }

    /// Makes `holder` hold every blob `from` holds.
    pub fn copy_blob_holds(&self, from: &str, holder: &str) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO blob_holders (holder, digest)
                 SELECT ?2, digest FROM blob_holders WHERE holder = ?1
                 ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![from, holder]))
            .map(|_| ())
            .map_err(|e| self.e("hold blobs", e))
    }

    /// Deletes the rows of blobs nothing holds, returning their digests.
    pub fn delete_unheld_blobs(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "DELETE FROM blobs WHERE digest NOT IN (SELECT digest FROM blob_holders)
                 RETURNING digest",
            )
            .map_err(|e| self.e("collect blobs", e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("collect blobs", e))?;
        Ok(rows)
    }

    /// Every blob digest the content store records.
    pub fn blob_digests(&self) -> Result<Vec<String>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT digest FROM blobs")
            .map_err(|e| self.e("list blobs", e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("list blobs", e))?;
        Ok(rows)
    }

    /// Records the manifest image `name` was imported with.
    pub fn set_image_manifest(&self, name: &str, manifest: &str) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE images SET manifest = ?2 WHERE name = ?1")
            .and_then(|mut s| s.execute(params![name, manifest]))
            .map(|_| ())
            .map_err(|e| self.e("record the image's manifest", e))
    }

    /// The manifest image `name` was imported with, if any.
    pub fn image_manifest(&self, name: &str) -> Result<Option<String>> {
        self.tx
            .prepare_cached("SELECT manifest FROM images WHERE name = ?1")
            .and_then(|mut s| {
                s.query_row([name], |r| r.get::<_, Option<String>>(0))
                    .optional()
            })
            .map(Option::flatten)
            .map_err(|e| self.e("look up the image's manifest", e))
    }

    /// Names of the leases whose name starts with `prefix`.
    pub fn leases_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT name FROM leases WHERE substr(name, 1, ?2) = ?1 ORDER BY name")
            .map_err(|e| self.e("list leases", e))?;
        let len = i64::try_from(prefix.chars().count()).unwrap_or(i64::MAX);
        let names = stmt
            .query_map(params![prefix, len], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("list leases", e))?;
        Ok(names)
    }

    /// Every snapshot row, by id.
    pub fn all_rows(&self) -> Result<Vec<Row>> {
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM snapshots s ORDER BY s.id"
            ))
            .map_err(|e| self.e("list snapshots", e))?;
        let rows = stmt
            .query_map([], read_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("list snapshots", e))?;
        Ok(rows)
    }

    /// Whether snapshot `id` carries the `containerd.io/gc.root` label.
    pub fn is_gc_root(&self, id: u64) -> Result<bool> {
        self.tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM labels
                 WHERE snapshot_id = ?1 AND name = 'containerd.io/gc.root')",
            )
            .and_then(|mut s| s.query_row([db_id(id)], |r| r.get(0)))
            .map_err(|e| self.e("check the gc.root label", e))
    }

    /// Every id that has a row, a journal entry, a spare or a flattened lower.
    pub fn known_ids(&self) -> Result<std::collections::HashSet<u64>> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT id FROM snapshots UNION SELECT snapshot_id FROM journal
                 UNION SELECT id FROM spares UNION SELECT id FROM flats",
            )
            .map_err(|e| self.e("list ids", e))?;
        let ids = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .and_then(|rows| {
                rows.map(|r| r.map(id_of))
                    .collect::<rusqlite::Result<std::collections::HashSet<_>>>()
            })
            .map_err(|e| self.e("list ids", e))?;
        Ok(ids)
    }

    /// The Info of a row.
    pub fn info(&self, row: &Row) -> Result<Info> {
        let parent = match row.parent_id {
            Some(p) => self.key_of(p)?,
            None => None,
        };
        Ok(Info {
            kind: row.kind,
            name: row.key.clone(),
            parent,
            labels: self.labels(row.id)?,
            created: row.created,
            updated: row.updated,
        })
    }

    /// Every snapshot matching `filter`, ordered by name. The filter is evaluated in SQL so
    /// that lookups by name, parent, kind or label use the indexes.
    pub fn select(&self, filter: &Filter) -> Result<Vec<Info>> {
        let mut sql = format!(
            "SELECT {ROW_COLUMNS}, p.key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
        );
        let mut args: Vec<String> = Vec::new();
        if !filter.any.is_empty() {
            let mut ors = Vec::new();
            for all in &filter.any {
                let mut ands = Vec::new();
                for sel in all {
                    ands.push(selector_sql(&sel.field, &sel.op, &mut args));
                }
                ors.push(format!("({})", ands.join(" AND ")));
            }
            sql.push_str(" WHERE ");
            sql.push_str(&ors.join(" OR "));
        }
        sql.push_str(" ORDER BY s.key");
        let mut stmt = self
            .tx
            .prepare_cached(&sql)
            .map_err(|e| self.e("walk", e))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((read_row(r)?, r.get::<_, Option<String>>(ROW_COLUMN_COUNT)?))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.e("walk", e))?;
        rows.into_iter()
            .map(|(row, parent)| {
                Ok(Info {
                    kind: row.kind,
                    name: row.key,
                    parent,
                    labels: self.labels(row.id)?,
                    created: row.created,
                    updated: row.updated,
                })
            })
            .collect()
    }
}

/// The SQL condition for one selector, pushing its arguments (numbered `?N`).
fn selector_sql(field: &Field, op: &Op, args: &mut Vec<String>) -> String {
    let mut arg = |v: &str| {
        args.push(v.to_string());
        format!("?{}", args.len())
    };
    match (field, op) {
        (Field::Name, Op::Present) | (Field::Kind, Op::Present) => "1".into(),
        (Field::Name, Op::Equal(v)) => format!("s.key = {}", arg(v)),
        (Field::Name, Op::NotEqual(v)) => format!("s.key != {}", arg(v)),
        (Field::Parent, Op::Present) => "s.parent_id IS NOT NULL".into(),
        // As in containerd, an absent parent is not "present", so `parent==""` matches nothing.
        (Field::Parent, Op::Equal(v)) if v.is_empty() => "0".into(),
        (Field::Parent, Op::Equal(v)) => format!(
            "s.parent_id = (SELECT id FROM snapshots WHERE key = {})",
            arg(v)
        ),
        (Field::Parent, Op::NotEqual(v)) if v.is_empty() => "s.parent_id IS NOT NULL".into(),
        (Field::Parent, Op::NotEqual(v)) => format!("COALESCE(p.key, '') != {}", arg(v)),
        (Field::Kind, Op::Equal(v)) => format!("s.kind = {}", kind_sql(v)),
        (Field::Kind, Op::NotEqual(v)) => format!("s.kind != {}", kind_sql(v)),
        (Field::Label(k), Op::Present) => format!(
            "s.id IN (SELECT snapshot_id FROM labels WHERE name = {})",
            arg(k)
        ),
        (Field::Label(k), Op::Equal(v)) => {
            let (k, v) = (arg(k), arg(v));
            format!("s.id IN (SELECT snapshot_id FROM labels WHERE name = {k} AND value = {v})")
        }
        // An absent label compares as "" (containerd's rule, as `Selector::matches`), so
        // `labels.k!=""` selects the snapshots whose label k is set and not empty.
        (Field::Label(k), Op::NotEqual(v)) => {
            let (k, v) = (arg(k), arg(v));
            format!("COALESCE((SELECT value FROM labels WHERE snapshot_id = s.id AND name = {k}), '') != {v}")
        }
    }
}

fn kind_sql(v: &str) -> i64 {
    // The parser has already refused unknown kinds; -1 matches nothing.
    v.parse::<Kind>().map(Kind::to_db).unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The plan SQLite picks for `sql`, one detail line per step.
    fn plan(meta: &Meta, sql: &str, args: &[&str]) -> String {
        let mut stmt = meta
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                r.get::<_, String>(3)
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("\n")
    }

    /// A step that reads a whole table (as opposed to an index search).
    fn scans_a_table(plan: &str) -> bool {
        plan.lines()
            .any(|l| l.starts_with("SCAN") && !l.contains("USING") && !l.contains("CONSTANT"))
    }

    #[test]
    fn lookups_use_indexes() {
        let tmp = tempfile::tempdir().unwrap();
        let meta = Meta::open(tmp.path(), Duration::from_secs(1)).unwrap();
        // The detector does see a full scan (no index on created_ns).
        let p = plan(
            &meta,
            "SELECT * FROM snapshots WHERE created_ns = ?1",
            &["1"],
        );
        assert!(scans_a_table(&p), "{p}");
        for (sql, args) in [
            (
                format!("SELECT {ROW_COLUMNS} FROM snapshots s WHERE s.key = ?1"),
                vec!["k"],
            ),
            (
                "SELECT EXISTS (SELECT 1 FROM snapshots WHERE parent_id = ?1)
                     OR EXISTS (SELECT 1 FROM journal WHERE parent_id = ?1 AND op = 'create')"
                    .to_string(),
                vec!["1"],
            ),
            (
                "SELECT EXISTS (SELECT 1 FROM snapshots WHERE key = ?1)
                     OR EXISTS (SELECT 1 FROM journal WHERE key = ?1)"
                    .to_string(),
                vec!["k"],
            ),
        ] {
            let p = plan(&meta, &sql, &args);
            assert!(!scans_a_table(&p), "{sql}\n{p}");
        }
        for f in [
            "name==a",
            "parent==a",
            "kind==active",
            "labels.x",
            "labels.x==1",
        ] {
            let filter = Filter::parse_all(&[f]).unwrap();
            let mut args = Vec::new();
            let sel = &filter.any[0][0];
            let cond = selector_sql(&sel.field, &sel.op, &mut args);
            let sql = format!(
                "SELECT {ROW_COLUMNS}, p.key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id WHERE {cond}"
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let p = plan(&meta, &sql, &args);
            assert!(!scans_a_table(&p), "filter {f}:\n{p}");
        }
    }
}
