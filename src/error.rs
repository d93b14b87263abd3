//! The one error type of the storage and node layers, and the one mapping from it to gRPC
//! status codes. Every variant carries a message written for the operator: what failed and,
//! where it helps, what to do about it.

use thiserror::Error;

use crate::exec::ExecError;

/// A failure of a pool, node or CSI operation.
#[derive(Debug, Error)]
pub enum Error {
    /// The request is malformed: a required field is missing or a value is not allowed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or node named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken by an object that is incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// No pool has room (or none matches the requested topology).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The requested capacity cannot be provided.
    #[error("{0}")]
    OutOfRange(String),
    /// The object is in a state that forbids the operation (in use, has dependents…).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same object is in progress; retry later.
    #[error("{0}")]
    Aborted(String),
    /// The operation is not supported by this pool kind or driver.
    #[error("{0}")]
    Unimplemented(String),
    /// A peer (agent, NFS server) could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A call did not finish within its deadline (a hung or very slow filesystem or device).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// An external command failed.
    #[error("{context}: {source}")]
    Exec {
        /// What holdfast was doing.
        context: String,
        /// The command, its exit code and its stderr.
        source: ExecError,
    },
    /// A file-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What holdfast was doing, naming the path.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Anything else that is holdfast's own fault.
    #[error("{0}")]
    Internal(String),
}

/// Longest piece of caller-supplied text (an id, a name, a path) that goes into a message or
/// a log line; the rest is cut and its length noted.
pub const MAX_ECHO: usize = 256;

// issue 14: events
/// Caller-supplied text as a structured log field: cut to [`MAX_ECHO`] bytes (at a character
/// boundary), not quoted; the log writer escapes what could break a line (JSON, or one-line text).
pub fn cut(s: &str) -> &str {
    if s.len() <= MAX_ECHO {
        return s;
    }
    let mut end = MAX_ECHO;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Caller-supplied text made safe to echo: control characters escaped (no forged log lines),
/// cut to [`MAX_ECHO`] bytes with the full length noted (no oversized gRPC messages), quoted.
pub fn bounded(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_ECHO) + 2);
    out.push('"');
    let mut cut = false;
    for c in s.chars() {
        let piece: String = match c {
            '"' => "\\\"".into(),
            '\\' => "\\\\".into(),
            c if c.is_control() => c.escape_default().collect(),
            c => c.to_string(),
        };
        if out.len() + piece.len() > MAX_ECHO + 1 {
            cut = true;
            break;
        }
        out.push_str(&piece);
    }
    out.push('"');
    if cut {
        out.push_str(&format!(" (cut, {} bytes in all)", s.len()));
    }
    out
}

/// Longest gRPC status message sent: the final safety net under [`bounded`], so no message can
/// grow into metadata a client refuses.
pub const MAX_MESSAGE: usize = 1024;

/// `msg` fit to be a status message: control characters other than newline and tab escaped
/// (no terminal escapes reach an operator's screen), cut to [`MAX_MESSAGE`] bytes with the
/// full length noted.
pub fn status_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(MAX_MESSAGE));
    for c in msg.chars() {
        let piece: String = if c.is_control() && c != '\n' && c != '\t' { c.escape_default().collect() } else { c.to_string() };
        if out.len() + piece.len() > MAX_MESSAGE - 40 {
            out.push_str(&format!("… (cut, {} bytes in all)", msg.len()));
            return out;
        }
        out.push_str(&piece);
    }
    out
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
    /// Wraps a command failure with what was being done.
    pub fn exec(context: impl Into<String>, source: ExecError) -> Self {
        Error::Exec { context: context.into(), source }
    }
}

/// Adds context to `io::Result` and `Result<_, ExecError>`.
pub trait Context<T> {
    /// Turns the error into an [`Error`] that says what was being done.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

impl<T> Context<T> for std::result::Result<T, ExecError> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::exec(what(), e))
    }
}

/// The single mapping to gRPC codes (CSI spec, "Error Scheme"):
///
/// | failure | code |
/// |---|---|
/// | malformed request | INVALID_ARGUMENT |
/// | unknown volume / snapshot / node | NOT_FOUND |
/// | name reused with an incompatible request | ALREADY_EXISTS |
/// | no pool has room / fits the topology | RESOURCE_EXHAUSTED |
/// | capacity impossible | OUT_OF_RANGE |
/// | in use, has dependents, wrong state | FAILED_PRECONDITION |
/// | operation already in progress on the object | ABORTED |
/// | not supported here | UNIMPLEMENTED |
/// | agent or server unreachable | UNAVAILABLE |
/// | a call stuck past its deadline (hung storage) | DEADLINE_EXCEEDED |
/// | external command or I/O failed, a bug | INTERNAL |
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Exec { source: ExecError::Timeout { .. }, .. } => Code::DeadlineExceeded,
            Error::Exec { .. } | Error::Io { .. } | Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, status_message(&e.to_string()))
    }
}

impl Error {
    /// The error a peer (an agent, the controller) answered with `status`, under the same code,
    /// so a routed call fails as it would have where it ran; the message is kept (it is already
    /// bounded by the peer) and prefixed with `peer` when that is not empty. Codes the spec
    /// gives no meaning here (UNKNOWN, PERMISSION_DENIED…) become INTERNAL.
    pub fn from_status(status: &tonic::Status, peer: &str) -> Error {
        use tonic::Code;
        let m = if peer.is_empty() { status.message().to_owned() } else { format!("{peer}: {}", status.message()) };
        match status.code() {
            Code::InvalidArgument => Error::InvalidArgument(m),
            Code::NotFound => Error::NotFound(m),
            Code::AlreadyExists => Error::AlreadyExists(m),
            Code::ResourceExhausted => Error::ResourceExhausted(m),
            Code::OutOfRange => Error::OutOfRange(m),
            Code::FailedPrecondition => Error::FailedPrecondition(m),
            Code::Aborted => Error::Aborted(m),
            Code::Unimplemented => Error::Unimplemented(m),
            Code::Unavailable => Error::Unavailable(m),
            Code::DeadlineExceeded => Error::DeadlineExceeded(m),
            code => Error::Internal(format!("{m} (code {code:?})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_failure_maps_to_its_code() {
        struct Case {
            err: Error,
            want: Code,
        }
        let failed = ExecError::Failed { cmd: "mkfs.ext4 /dev/loop3".into(), code: 1, stdout: String::new(), stderr: "bad\n".into() };
        let cases = [
            Case { err: Error::InvalidArgument("x".into()), want: Code::InvalidArgument },
            Case { err: Error::NotFound("x".into()), want: Code::NotFound },
            Case { err: Error::AlreadyExists("x".into()), want: Code::AlreadyExists },
            Case { err: Error::ResourceExhausted("x".into()), want: Code::ResourceExhausted },
            Case { err: Error::OutOfRange("x".into()), want: Code::OutOfRange },
            Case { err: Error::FailedPrecondition("x".into()), want: Code::FailedPrecondition },
            Case { err: Error::Aborted("x".into()), want: Code::Aborted },
            Case { err: Error::Unimplemented("x".into()), want: Code::Unimplemented },
            Case { err: Error::Unavailable("x".into()), want: Code::Unavailable },
            Case { err: Error::DeadlineExceeded("x".into()), want: Code::DeadlineExceeded },
            Case { err: Error::exec("formatting", failed), want: Code::Internal },
            Case { err: Error::io("reading /x", std::io::Error::other("boom")), want: Code::Internal },
        ];
        for c in cases {
            assert_eq!(tonic::Status::from(c.err).code(), c.want);
        }
    }

    #[test]
    fn echoed_text_is_bounded_and_escaped() {
        assert_eq!(bounded("file:n:p:v"), "\"file:n:p:v\"");
        assert_eq!(bounded("a\nINFO forged"), "\"a\\nINFO forged\"");
        let long = bounded(&"x".repeat(10_000));
        assert!(long.len() < MAX_ECHO + 40 && long.ends_with("(cut, 10000 bytes in all)"), "{long}");
        assert!(bounded(&"é".repeat(300)).contains("(cut, 600 bytes in all)"), "cut on a character boundary");
    }

    #[test]
    fn status_messages_are_capped_and_escaped() {
        let s = tonic::Status::from(Error::NotFound(format!("volume {} does not exist", "v".repeat(10_000))));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().len() <= MAX_MESSAGE, "{} bytes", s.message().len());
        assert!(s.message().ends_with("(cut, 10022 bytes in all)"), "{}", s.message());
        let s = tonic::Status::from(Error::Internal("a\x1b[31mred\r\nnext\tcol".into()));
        assert_eq!(s.message(), "a\\u{1b}[31mred\\r\nnext\tcol");
    }

    #[test]
    fn exec_failure_message_names_command_and_stderr() {
        let failed =
            ExecError::Failed { cmd: "mkfs.ext4 /dev/loop3".into(), code: 1, stdout: String::new(), stderr: "bad superblock\n".into() };
        let s = tonic::Status::from(Error::exec("formatting volume v1", failed));
        assert_eq!(s.message(), "formatting volume v1: `mkfs.ext4 /dev/loop3` failed with exit code 1: bad superblock");
    }
}
