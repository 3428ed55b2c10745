//! A TCP proxy between a test and a real service (PostgreSQL, RabbitMQ, a Kafka
//! broker) that injects network faults on demand: latency, a stall (bytes held,
//! connections left open) and a cut (connections reset, new ones refused).
//!
//! Point the client under test at [`FaultProxy::addr`] instead of the service; every
//! fault applies at once to the connections already open and to new ones, and can be
//! switched from the test at any time.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use outbox_tests::fault_proxy::FaultProxy;
//!
//! let proxy = FaultProxy::start("127.0.0.1:5432".parse().expect("socket address")).await?;
//! let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
//! proxy.stall(); // queries over `url` hang, connections stay open
//! proxy.resume(); // the held bytes flow, the queries complete
//! proxy.cut(); // connections are reset, new ones refused
//! proxy.restore(); // pass-through again
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do: drop or reorder single packets, or throttle bandwidth. Faults
//! act on chunks of bytes as the proxy reads them, not on TCP segments.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest chunk read from one side before it is passed to the other.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks read but not yet written, per direction; beyond this the proxy stops reading
/// and TCP flow control pushes back on the sender.
const CHUNKS_IN_FLIGHT: usize = 64;
/// How long connecting to the upstream service may take before the client is reset.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

/// The faults in force; every connection task watches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Faults {
    /// Added to every chunk, in each direction.
    latency: Duration,
    /// Nothing is read or written, and new connections are not forwarded.
    stalled: bool,
    /// New connections are reset as soon as they are accepted.
    refusing: bool,
    /// Bumped by every `cut()`: a connection opened under an older epoch is reset. A
    /// counter, not a flag, so that a `cut()` quickly followed by `restore()` still
    /// reaches every connection, even one that did not look in between.
    cut_epoch: u64,
}

#[derive(Debug, Default)]
struct Counters {
    active: AtomicUsize,
    accepted: AtomicU64,
}

/// A TCP proxy on `127.0.0.1:<ephemeral port>` that forwards every connection to one
/// upstream address, with faults switchable while connections are open.
///
/// Dropping it stops the listener and aborts every connection it forwards.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    counters: Arc<Counters>,
    accept_task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every accepted connection to `upstream`,
    /// with no fault in force.
    ///
    /// The upstream is only dialled when a client connects, so it need not be up yet.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (faults, watcher) = watch::channel(Faults::default());
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            watcher,
            Arc::clone(&counters),
        ));
        tracing::debug!(%addr, %upstream, "fault proxy started");
        Ok(FaultProxy {
            addr,
            upstream,
            faults,
            counters,
            accept_task,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients should connect to (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The service every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Delays every chunk of bytes by `latency` in each direction, so a request and its
    /// reply take at least twice that; order is kept. Applies to bytes already queued
    /// too. `Duration::ZERO` removes the delay.
    pub fn set_latency(&self, latency: Duration) {
        self.faults.send_modify(|f| f.latency = latency);
    }

    /// Holds every byte in both directions: nothing more is read or forwarded, but
    /// connections stay open, as on a network path that silently stopped delivering.
    /// New connections are accepted and held, not forwarded. Undone by [`resume`]
    /// or [`restore`].
    ///
    /// [`resume`]: FaultProxy::resume
    /// [`restore`]: FaultProxy::restore
    pub fn stall(&self) {
        self.faults.send_modify(|f| f.stalled = true);
    }

    /// Ends a [`stall`](FaultProxy::stall): the held bytes are forwarded in order and
    /// held connections are forwarded. Leaves latency and a cut as they are.
    pub fn resume(&self) {
        self.faults.send_modify(|f| f.stalled = false);
    }

    /// Resets every open connection on both sides (a close with `SO_LINGER` 0 sends
    /// RST, discarding unsent bytes), and resets new connections as soon as they are
    /// accepted, until [`restore`](FaultProxy::restore). A client's connect may still
    /// succeed at the TCP level; its first read or write then fails.
    ///
    /// Open connections are reset by their tasks within moments of the call, not
    /// before it returns; wait for [`connections`](FaultProxy::connections) to reach 0
    /// when that matters.
    pub fn cut(&self) {
        self.faults.send_modify(|f| {
            f.refusing = true;
            f.cut_epoch += 1;
        });
    }

    /// Back to pass-through: ends a cut and a stall, and removes latency.
    pub fn restore(&self) {
        self.faults.send_modify(|f| {
            f.latency = Duration::ZERO;
            f.stalled = false;
            f.refusing = false;
        });
    }

    /// Connections currently open through the proxy (held ones included, refused ones
    /// not).
    pub fn connections(&self) -> usize {
        self.counters.active.load(Ordering::Relaxed)
    }

    /// Connections accepted since the start, including those reset at once by a cut.
    pub fn total_accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("faults", &*self.faults.borrow())
            .field("connections", &self.connections())
            .field("total_accepted", &self.total_accepted())
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the `JoinSet` of connection tasks; aborting it drops the
        // set, which aborts them all, which closes their sockets.
        self.accept_task.abort();
    }
}

/// Counts one open connection for as long as its task lives, aborted or not.
struct ActiveConnection(Arc<Counters>);

impl ActiveConnection {
    fn new(counters: &Arc<Counters>) -> Self {
        counters.active.fetch_add(1, Ordering::Relaxed);
        ActiveConnection(Arc::clone(counters))
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    counters: Arc<Counters>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    let now = *faults.borrow();
                    if now.refusing {
                        tracing::debug!(%peer, %upstream, "fault proxy: refused (cut)");
                        reset(&client);
                        continue;
                    }
                    set_nodelay(&client);
                    let active = ActiveConnection::new(&counters);
                    let faults = faults.clone();
                    connections.spawn(async move {
                        let _active = active;
                        run_connection(client, peer, upstream, faults, now.cut_epoch).await;
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, %upstream, "fault proxy: accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = joined
                    && error.is_panic()
                {
                    tracing::error!(%error, %upstream, "fault proxy: connection task panicked");
                }
            }
        }
    }
}

async fn run_connection(
    mut client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    epoch: u64,
) {
    let cut = cut_after(faults.clone(), epoch);
    tokio::pin!(cut);

    let connected = tokio::select! {
        biased;
        () = &mut cut => {
            reset(&client);
            tracing::debug!(%peer, %upstream, "fault proxy: cut before forwarding");
            return;
        }
        connected = connect_when_flowing(upstream, faults.clone()) => connected,
    };
    let mut server = match connected {
        Ok(server) => server,
        Err(error) => {
            tracing::warn!(%error, %peer, %upstream, "fault proxy: cannot reach upstream");
            reset(&client);
            return;
        }
    };
    set_nodelay(&server);

    let ended = tokio::select! {
        biased;
        () = &mut cut => Err(None),
        spliced = splice(&mut client, &mut server, &faults) => spliced.map_err(Some),
    };
    match ended {
        // Both sides closed in turn; dropping the sockets finishes the close.
        Ok(()) => tracing::debug!(%peer, %upstream, "fault proxy: connection closed"),
        Err(None) => {
            tracing::debug!(%peer, %upstream, "fault proxy: connection cut");
            reset(&client);
            reset(&server);
        }
        // One side failed (usually reset); pass the failure on to the other rather than a
        // clean close it would mistake for an orderly end.
        Err(Some(error)) => {
            tracing::debug!(%error, %peer, %upstream, "fault proxy: connection failed");
            reset(&client);
            reset(&server);
        }
    }
}

/// Completes when a `cut()` happened after the connection was accepted, or the proxy
/// is gone.
async fn cut_after(mut faults: watch::Receiver<Faults>, epoch: u64) {
    // An error means the proxy was dropped: its connections end as if cut.
    let _ = faults.wait_for(|f| f.cut_epoch != epoch).await;
}

/// Connects to the upstream once no stall is in force, so that a connection accepted
/// during a stall is held without the service seeing it (and timing it out).
async fn connect_when_flowing(
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
) -> io::Result<TcpStream> {
    if faults.wait_for(|f| !f.stalled).await.is_err() {
        return Err(io::Error::other("fault proxy dropped"));
    }
    tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to upstream"))?
}

async fn splice(
    client: &mut TcpStream,
    server: &mut TcpStream,
    faults: &watch::Receiver<Faults>,
) -> io::Result<()> {
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::try_join!(
        pipe(client_read, server_write, faults.clone()),
        pipe(server_read, client_write, faults.clone()),
    )?;
    Ok(())
}

/// A chunk as read, stamped with when, so latency counts from the read and not from
/// when the writer got to it.
struct Chunk {
    read_at: Instant,
    /// Empty means end of stream: the writer passes the close on.
    bytes: Vec<u8>,
}

/// Forwards one direction: a reader and a writer joined by a bounded queue, so a
/// delayed chunk never holds back the reading of the next one.
async fn pipe(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    faults: watch::Receiver<Faults>,
) -> io::Result<()> {
    let (chunks, mut queued) = mpsc::channel::<Chunk>(CHUNKS_IN_FLIGHT);
    let mut reader_faults = faults.clone();
    let read = async move {
        loop {
            // While stalled nothing is read: the sender's bytes wait in socket buffers and
            // TCP flow control pushes back, as on a stuck network path.
            if reader_faults.wait_for(|f| !f.stalled).await.is_err() {
                return Ok(());
            }
            let mut bytes = vec![0; CHUNK_BYTES];
            let read = from.read(&mut bytes).await?;
            bytes.truncate(read);
            let read_at = Instant::now();
            let end = bytes.is_empty();
            if chunks.send(Chunk { read_at, bytes }).await.is_err() || end {
                // The writer is gone (its own error ends the pipe) or this was the end.
                return Ok::<(), io::Error>(());
            }
        }
    };
    let write = async move {
        let mut faults = faults;
        while let Some(chunk) = queued.recv().await {
            wait_for_release(&mut faults, chunk.read_at).await;
            if chunk.bytes.is_empty() {
                // Half-close: the other direction may still carry a reply.
                return to.shutdown().await;
            }
            to.write_all(&chunk.bytes).await?;
        }
        Ok(())
    };
    tokio::try_join!(read, write)?;
    Ok(())
}

/// Waits until a chunk read at `read_at` may be written: its latency has passed and no
/// stall is in force. Reads the faults afresh on every change, so a new latency or a
/// `resume()` applies to chunks already queued.
async fn wait_for_release(faults: &mut watch::Receiver<Faults>, read_at: Instant) {
    loop {
        let (due, stalled) = {
            let now = faults.borrow_and_update();
            (read_at + now.latency, now.stalled)
        };
        if stalled {
            if faults.changed().await.is_err() {
                return;
            }
            continue;
        }
        if Instant::now() >= due {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            changed = faults.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

/// Makes the coming close send RST instead of FIN, as when a host or path dies.
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        // Closing with FIN still ends the connection; only the abruptness is lost.
        tracing::debug!(%error, "fault proxy: cannot set SO_LINGER 0");
    }
}

/// Forwards small writes at once, so added latency is the only delay a test sees.
fn set_nodelay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "fault proxy: cannot set TCP_NODELAY");
    }
}
