//! Log lines written by a thread of their own, so a slow log sink never holds a
//! delivery.
//!
//! A line is formatted on the thread that logs it and appended to a shared
//! buffer; the writer thread takes the whole buffer and writes it with one
//! `write_all`. While the thread writes, new lines gather in the buffer, so
//! under load many lines go out in one system call, and when idle a line goes
//! out as soon as it is logged. A sink that stalls (a full pipe to the
//! container runtime, a file system flushing its journal) stalls only this
//! thread until [`LIMIT`] bytes wait: then loggers wait for room, so no line is
//! dropped and memory stays bounded. [`Flush`] writes what is left when the
//! process ends; after it (or when no thread could start) each line is written
//! by the thread that logs it.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Bytes of log lines that may wait for the sink before loggers wait too.
pub const LIMIT: usize = 1 << 20;
/// How long [`Flush`] waits for the queued lines to be written: a sink that
/// never drains must not keep a stopping process alive.
pub const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type Sink = Box<dyn Write + Send>;

struct Queue {
    lines: Vec<u8>,
    /// Set by [`Flush`]: the thread writes what is queued, hands the sink back here and ends.
    closing: bool,
    /// The sink, while no writer thread holds it: loggers write to it directly.
    inline: Option<Sink>,
    /// The writer thread has ended.
    done: bool,
    /// [`Flush`] waited [`FLUSH_TIMEOUT`] and the writer did not end.
    gave_up: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Lines arrived in an empty queue, or the queue is closing.
    arrived: Condvar,
    /// The writer took the queue's lines.
    taken: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A logger that panicked mid-append left at worst a partial line.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Appends to the queue; the fmt layer's `MakeWriter`.
#[derive(Clone)]
pub struct Lines(Arc<Shared>);

impl Write for &Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let shared = &self.0;
        let mut queue = shared.lock();
        loop {
            if let Some(sink) = queue.inline.as_mut() {
                return sink.write_all(buf).map(|()| buf.len());
            }
            if queue.lines.len() < LIMIT {
                break;
            }
            if queue.gave_up {
                // The process is stopping and the sink took nothing for
                // FLUSH_TIMEOUT: drop the line rather than wait for ever.
                return Ok(buf.len());
            }
            queue = shared.taken.wait(queue).unwrap_or_else(|p| p.into_inner());
        }
        let was_empty = queue.lines.is_empty();
        queue.lines.extend_from_slice(buf);
        drop(queue);
        // The writer sleeps only on an empty queue: a line after others needs no wake-up.
        if was_empty {
            shared.arrived.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = &'a Lines;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Ends the writer thread once every queued line is written (on drop, or [`Flush::flush`]).
pub struct Flush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Flush {
    /// Writes every line queued so far and stops the writer thread; later
    /// lines are written by the thread that logs them. Gives up after
    /// [`FLUSH_TIMEOUT`] if the sink takes nothing (the lines left are lost).
    pub fn flush(&mut self) {
        self.flush_within(FLUSH_TIMEOUT);
    }

    fn flush_within(&mut self, timeout: std::time::Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let mut queue = self.shared.lock();
        queue.closing = true;
        self.shared.arrived.notify_one();
        let (queue, _) = self
            .shared
            .taken
            .wait_timeout_while(queue, timeout, |q| !q.done)
            .unwrap_or_else(|p| p.into_inner());
        if queue.done {
            drop(queue);
            let _ = thread.join();
        } else {
            let mut queue = queue;
            queue.gave_up = true;
            drop(queue);
            self.shared.taken.notify_all();
        }
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Starts the writer thread over `sink`. Without a thread (the system refused
/// one) lines are written by whoever logs them.
pub fn spawn(sink: Sink) -> (Lines, Flush) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            lines: Vec::new(),
            closing: false,
            inline: None,
            done: false,
            gave_up: false,
        }),
        arrived: Condvar::new(),
        taken: Condvar::new(),
    });
    // The thread takes the sink from `slot`; if no thread starts, the sink
    // goes to the queue and loggers write to it themselves.
    let slot = Arc::new(Mutex::new(Some(sink)));
    let thread = {
        let (shared, slot) = (Arc::clone(&shared), Arc::clone(&slot));
        std::thread::Builder::new()
            .name("herald-log".into())
            .spawn(move || {
                if let Some(sink) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    write_until_closed(&shared, sink);
                }
            })
    };
    let thread = match thread {
        Ok(thread) => Some(thread),
        Err(e) => {
            eprintln!("warning: no log writer thread ({e}): log lines are written inline");
            shared.lock().inline = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            None
        }
    };
    (Lines(Arc::clone(&shared)), Flush { shared, thread })
}

/// The writer thread: takes the whole queue and writes it, until closed and
/// empty; then hands the sink back to the queue.
fn write_until_closed(shared: &Shared, mut sink: Sink) {
    let mut spare = Vec::new();
    loop {
        let mut queue = shared.lock();
        while queue.lines.is_empty() && !queue.closing {
            queue = shared
                .arrived
                .wait(queue)
                .unwrap_or_else(|p| p.into_inner());
        }
        if queue.lines.is_empty() {
            queue.inline = Some(sink);
            queue.done = true;
            drop(queue);
            shared.taken.notify_all();
            return;
        }
        std::mem::swap(&mut queue.lines, &mut spare);
        drop(queue);
        shared.taken.notify_all();
        // A sink that refuses (stderr closed) loses these lines, as it would inline.
        let _ = sink.write_all(&spare).and_then(|()| sink.flush());
        spare.clear();
        // Keep a buffer for the next batch, but not a burst's worth for ever.
        if spare.capacity() > LIMIT {
            spare = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A sink that records each `write_all` and can be held shut.
    #[derive(Clone, Default)]
    struct Recorder {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicUsize>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(lines: &Lines, line: &str) {
        let mut w = lines;
        w.write_all(line.as_bytes()).unwrap();
    }

    /// With the sink shut: logs "first\n", which the writer takes and waits
    /// with, then fills the queue to the limit with 100-byte lines (each
    /// returns at once: the sink is not on this thread). Returns their number.
    fn fill_while_shut(lines: &Lines) -> usize {
        log(lines, "first\n");
        while !lines.0.lock().lines.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let line = "x".repeat(99) + "\n";
        let fill = LIMIT.div_ceil(100);
        for _ in 0..fill {
            log(lines, &line);
        }
        fill
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_flush_returns() {
        let sink = Recorder::default();
        let (lines, mut flush) = spawn(Box::new(sink.clone()));
        let loggers: Vec<_> = (0..4)
            .map(|t| {
                let lines = lines.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        log(&lines, &format!("t{t} line {i}\n"));
                    }
                })
            })
            .collect();
        for l in loggers {
            l.join().unwrap();
        }
        flush.flush();
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 8_000);
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            let expected: Vec<String> = (0..2_000).map(|i| format!("t{t} line {i}")).collect();
            assert_eq!(mine, expected, "thread {t}'s lines out of order or lost");
        }
        // After the flush, a line is written at once by its logger.
        log(&lines, "after\n");
        assert!(sink.bytes.lock().unwrap().ends_with(b"after\n"));
    }

    #[test]
    fn a_stalled_sink_holds_no_logger_until_the_limit_and_lines_batch_meanwhile() {
        let sink = Recorder::default();
        let (lines, mut flush) = spawn(Box::new(sink.clone()));
        let shut = sink.gate.lock().unwrap();
        let fill = fill_while_shut(&lines);
        // The next line finds the queue full and waits for the sink.
        let waiting = {
            let lines = lines.clone();
            std::thread::spawn(move || log(&lines, "last\n"))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished(), "a logger went past the limit");
        drop(shut);
        waiting.join().unwrap();
        flush.flush();
        let bytes = sink.bytes.lock().unwrap().clone();
        assert_eq!(bytes.len(), 6 + fill * 100 + 5);
        assert!(bytes.ends_with(b"last\n"));
        // "first", the batch gathered while the sink was shut, then "last" (or both together).
        assert!(
            sink.writes.load(Ordering::SeqCst) <= 3,
            "{} writes",
            sink.writes.load(Ordering::SeqCst)
        );
    }

    #[test]
    fn flush_gives_up_on_a_sink_that_never_drains() {
        let sink = Recorder::default();
        let (lines, mut flush) = spawn(Box::new(sink.clone()));
        let _shut = sink.gate.lock().unwrap();
        log(&lines, "stuck\n");
        let started = std::time::Instant::now();
        flush.flush_within(Duration::from_millis(200));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "flush waited {:?}",
            started.elapsed()
        );
        // Logging after it neither blocks nor grows without bound.
        let line = "y".repeat(999) + "\n";
        for _ in 0..(2 * LIMIT / 1000) {
            log(&lines, &line);
        }
        assert!(lines.0.lock().lines.len() <= LIMIT + 1000);
    }

    #[test]
    fn loggers_waiting_at_the_limit_when_the_flush_starts_lose_no_line() {
        let sink = Recorder::default();
        let (lines, mut flush) = spawn(Box::new(sink.clone()));
        let shut = sink.gate.lock().unwrap();
        let fill = fill_while_shut(&lines);
        // The flush starts (closing) while the queue is full and the sink shut;
        // loggers that come after it must wait for room, not drop their lines.
        let flushing = std::thread::spawn(move || flush.flush_within(Duration::from_secs(20)));
        while !lines.0.lock().closing {
            std::thread::sleep(Duration::from_millis(1));
        }
        let waiting: Vec<_> = (0..3)
            .map(|i| {
                let lines = lines.clone();
                std::thread::spawn(move || log(&lines, &format!("waiting {i}\n")))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            waiting.iter().all(|w| !w.is_finished()),
            "a logger went past the limit"
        );
        drop(shut);
        for w in waiting {
            w.join().unwrap();
        }
        flushing.join().unwrap();
        log(&lines, "after\n");
        let text = String::from_utf8(sink.bytes.lock().unwrap().clone()).unwrap();
        assert_eq!(text.len(), 6 + fill * 100 + 3 * 10 + 6, "a line was lost");
        for i in 0..3 {
            assert!(text.contains(&format!("waiting {i}\n")));
        }
        assert!(text.ends_with("after\n"));
    }
}
