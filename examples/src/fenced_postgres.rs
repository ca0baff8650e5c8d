//! Fenced writes to PostgreSQL: how a table refuses the writes of a lease holder that lost its
//! lease without knowing it (a long pause, a slow network), which no timeout can do.
//!
//! The recipe, on the table [`CREATE_TABLE`] makes (one row per invoice):
//!
//! 1. **A fence column of type `BIGINT`** (signed 64 bits) beside the data: the highest fence
//!    the row has accepted. [`Lease::fence`] is a `u64`, large on Redis (seeded by the server's
//!    clock in microseconds, about 2^51) and small on memory (1, 2, 3, ...); both fit, and
//!    [`fence_to_sql`] converts with a typed error instead of wrapping.
//! 2. **The fenced upsert** ([`write_total`]): `INSERT ... ON CONFLICT (invoice) DO UPDATE ...
//!    WHERE t.fence <= EXCLUDED.fence`. PostgreSQL checks the condition on the locked row, so
//!    two holders cannot both pass it; the affected row count tells the outcome: 1 accepted,
//!    0 refused (a higher fence wrote the row). `<=` rather than `<` lets one holder write
//!    several times, and after its own claim, with its one fence; it admits no other holder,
//!    since no two leases of a key share a fence. (With `<`, each lease could write a row once.)
//! 3. **The claim at acquisition** ([`claim`]): the same upsert, writing only the fence. Without
//!    it a stale holder's write is refused only once the new holder has written; a resource
//!    that must refuse the stale holder from the moment the lease changed hands (a job the old
//!    holder must not finish) claims its rows as soon as the lease is granted.
//! 4. **Cancelling the query when the lease is lost** ([`cancel_query_on_loss`], with
//!    [`Lease::on_lost`]): a holder blocked in a long statement learns nothing until it
//!    returns; PostgreSQL's cancel request interrupts it the moment the lease is lost.
//!
//! The fences protect the table only if every write to it goes through them, with the fence of
//! the lease on the same key: one lock key per row (or per group of rows) and one fence column.
//!

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lock_core::Lease;
use postgres::{CancelToken, GenericClient, NoTls};

/// Creates the example's table, if it does not exist: one row per invoice, its total (`NULL`
/// until a holder writes one) and the highest fence that wrote or claimed it.
pub const CREATE_TABLE: &str = "
    CREATE TABLE IF NOT EXISTS fenced_invoices (
        invoice TEXT PRIMARY KEY,
        total   BIGINT,
        fence   BIGINT NOT NULL
    )";

/// The fenced upsert: writes `total` ($2) with fence $3 unless the row holds a higher fence.
/// One affected row means accepted, none refused.
const WRITE_TOTAL: &str = "
    INSERT INTO fenced_invoices AS t (invoice, total, fence) VALUES ($1, $2, $3)
    ON CONFLICT (invoice) DO UPDATE SET total = EXCLUDED.total, fence = EXCLUDED.fence
    WHERE t.fence <= EXCLUDED.fence";

/// The claim: the fenced upsert of the fence alone (a new row gets no total).
const CLAIM: &str = "
    INSERT INTO fenced_invoices AS t (invoice, fence) VALUES ($1, $2)
    ON CONFLICT (invoice) DO UPDATE SET fence = EXCLUDED.fence
    WHERE t.fence <= EXCLUDED.fence";

/// What a fenced statement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The row took the write: its fence was not higher than ours, and now is ours.
    Accepted,
    /// The row holds a higher fence: a newer holder wrote or claimed it, so we are stale.
    Refused,
}

/// Why a fenced statement could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FencedWriteError {
    /// The fence does not fit PostgreSQL's `BIGINT` (above `i64::MAX`); no backend of this
    /// workspace issues such fences.
    #[error("fence {0} does not fit a BIGINT column")]
    FenceOutOfRange(u64),
    /// PostgreSQL refused or could not run the statement (its error is the source; a cancelled
    /// statement has the SQLSTATE `57014`, `query_canceled`).
    #[error("PostgreSQL statement failed")]
    Postgres(#[from] postgres::Error),
}

/// A row of the example's table, as [`read_invoice`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvoiceRow {
    /// The last accepted total; `None` if the row was only claimed.
    pub total: Option<i64>,
    /// The highest fence that wrote or claimed the row, as stored (a `BIGINT`; compare with
    /// [`fence_to_sql`] of a lease's fence).
    pub fence: i64,
}

/// `fence` as a `BIGINT` parameter.
///
/// # Errors
///
/// [`FencedWriteError::FenceOutOfRange`] above `i64::MAX`.
pub fn fence_to_sql(fence: u64) -> Result<i64, FencedWriteError> {
    i64::try_from(fence).map_err(|_| FencedWriteError::FenceOutOfRange(fence))
}

/// Runs [`CREATE_TABLE`].
///
/// # Errors
///
/// [`FencedWriteError::Postgres`] if PostgreSQL refuses it (no right to create tables, say).
pub fn create_table(client: &mut impl GenericClient) -> Result<(), FencedWriteError> {
    client.batch_execute(CREATE_TABLE)?;
    Ok(())
}

/// The claim at acquisition: makes `fence` the row's fence (creating the row if needed) unless
/// it holds a higher one, so that from now on every write with a lower fence is refused, even
/// before this holder writes. Call it right after the lease is granted.
///
/// # Errors
///
/// [`FencedWriteError::FenceOutOfRange`] or [`FencedWriteError::Postgres`].
pub fn claim(
    client: &mut impl GenericClient,
    invoice: &str,
    fence: u64,
) -> Result<WriteOutcome, FencedWriteError> {
    let rows = client.execute(CLAIM, &[&invoice, &fence_to_sql(fence)?])?;
    Ok(outcome(rows))
}

/// The fenced upsert: writes the invoice's `total` with `fence` unless the row holds a higher
/// fence; the affected row count tells [`WriteOutcome::Accepted`] from [`WriteOutcome::Refused`].
///
/// # Errors
///
/// [`FencedWriteError::FenceOutOfRange`] or [`FencedWriteError::Postgres`].
pub fn write_total(
    client: &mut impl GenericClient,
    invoice: &str,
    total: i64,
    fence: u64,
) -> Result<WriteOutcome, FencedWriteError> {
    let rows = client.execute(WRITE_TOTAL, &[&invoice, &total, &fence_to_sql(fence)?])?;
    Ok(outcome(rows))
}

/// The invoice's row, or `None` if no holder wrote or claimed it.
///
/// # Errors
///
/// [`FencedWriteError::Postgres`].
pub fn read_invoice(
    client: &mut impl GenericClient,
    invoice: &str,
) -> Result<Option<InvoiceRow>, FencedWriteError> {
    let row = client.query_opt(
        "SELECT total, fence FROM fenced_invoices WHERE invoice = $1",
        &[&invoice],
    )?;
    let row = row
        .map(|row| -> Result<InvoiceRow, postgres::Error> {
            Ok(InvoiceRow {
                total: row.try_get("total")?,
                fence: row.try_get("fence")?,
            })
        })
        .transpose()?;
    Ok(row)
}

/// One statement touches one row: 1 accepted, 0 refused.
fn outcome(rows: u64) -> WriteOutcome {
    if rows == 0 {
        WriteOutcome::Refused
    } else {
        WriteOutcome::Accepted
    }
}

/// Cancels the statement running on the connection of `token` (PostgreSQL's cancel request,
/// sent on a new connection) when `lease` is lost, until the returned guard is dropped.
///
/// The statement then fails with SQLSTATE `57014` (`query_canceled`); a transaction it ran in
/// is aborted, so nothing it wrote is committed. Make the token with
/// [`postgres::Client::cancel_token`] before starting the statement.
///
/// It costs no thread while the lease is held: [`Lease::on_lost`] runs the callback once, on
/// the thread that finds the loss (usually the manager's renewer, which must not block), and the
/// callback starts a short-lived thread that sends the cancel request. A loss at the very moment
/// the guard is dropped can still cancel the next statement on the connection; the fences
/// refuse its writes either way.
pub fn cancel_query_on_loss(lease: &Lease, token: CancelToken) -> CancelOnLoss {
    let armed = Arc::new(AtomicBool::new(true));
    let still_armed = armed.clone();
    lease.on_lost(move |reason| {
        if !still_armed.load(Ordering::SeqCst) {
            return;
        }
        let cancel = move || {
            if still_armed.load(Ordering::SeqCst) {
                // A failed cancel request leaves the statement to finish; the fences still
                // refuse what it writes.
                if let Err(error) = token.cancel_query(NoTls) {
                    eprintln!("cancel-on-loss: the cancel request failed: {error}");
                }
            }
        };
        let started = std::thread::Builder::new()
            .name("cancel-on-loss".into())
            .spawn(cancel);
        if let Err(error) = started {
            eprintln!("cancel-on-loss: lease lost ({reason}), but no thread to cancel: {error}");
        }
    });
    CancelOnLoss { armed }
}

/// Keeps [`cancel_query_on_loss`] armed; dropping it disarms it.
#[must_use = "the query is cancelled on loss only while the guard lives"]
#[derive(Debug)]
pub struct CancelOnLoss {
    armed: Arc<AtomicBool>,
}

impl Drop for CancelOnLoss {
    fn drop(&mut self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}
