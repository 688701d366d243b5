//! Client errors: each one a line that says what failed and what to do.

use tonic::Code;

/// What went wrong talking to the cluster.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// No server address answered.
    #[error("cannot reach a granary server at {addrs}: {message}; is `granary server` running there? (set --server or GRANARY_SERVER)")]
    Unreachable { addrs: String, message: String },
    /// The server refused the request; `message` is its explanation.
    #[error("{message}")]
    Server { code: Code, message: String },
    /// The request itself was malformed (e.g. a bad name), caught before sending.
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The gRPC code, for errors the server returned.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for "not found" answers.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(Code::NotFound)
    }
}

/// A status's message, or for a transport failure its innermost cause
/// ("Connection refused (os error 111)") rather than tonic's layers of wrapping.
pub fn status_cause(s: &tonic::Status) -> String {
    let mut msg = s.message().to_string();
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        msg = e.to_string();
        src = e.source();
    }
    msg
}
