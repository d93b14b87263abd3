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
            Error::Exec { source: ExecError::Timeout { .. }, .. } => Code::DeadlineExceeded,
            Error::Exec { .. } | Error::Io { .. } | Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
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
            Case { err: Error::exec("formatting", failed), want: Code::Internal },
            Case { err: Error::io("reading /x", std::io::Error::other("boom")), want: Code::Internal },
        ];
        for c in cases {
            assert_eq!(tonic::Status::from(c.err).code(), c.want);
        }
    }

    #[test]
    fn exec_failure_message_names_command_and_stderr() {
        let failed =
            ExecError::Failed { cmd: "mkfs.ext4 /dev/loop3".into(), code: 1, stdout: String::new(), stderr: "bad superblock\n".into() };
        let s = tonic::Status::from(Error::exec("formatting volume v1", failed));
        assert_eq!(s.message(), "formatting volume v1: `mkfs.ext4 /dev/loop3` failed with exit code 1: bad superblock");
    }
}
