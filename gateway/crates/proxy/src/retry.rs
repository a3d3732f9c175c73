//! The retry policy of the request path: which failed upstream attempts are tried again.
//!
//! Only a request that can be replayed (an idempotent method and no request body), only after a
//! connect failure or a reset (never a timeout, a failure the client caused, or anything
//! else), and at most `max_retries` times. Each retry also needs the pool's retry budget
//! ([`crate::upstream`]), which the request path asks separately.

use http::Method;

use crate::http_util::BodyLimitError;

/// Why an upstream attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection could be made: refused or unreachable.
    Connect,
    /// No connection was made within the connect timeout.
    ConnectTimeout,
    /// The node's own resources ran out while connecting (file descriptors, local ports).
    Local,
    /// The connection was reset or closed mid-exchange.
    Reset,
    /// No answer within the request timeout.
    Timeout,
    /// The client's body broke (too large, stalled, cut off): the client's fault.
    Body(BodyLimitError),
    /// Anything else.
    Other,
}

impl Failure {
    /// Metric label (`gateway_upstream_errors_total{kind}`).
    pub(crate) fn label(self) -> &'static str {
        match self {
            Failure::Connect | Failure::ConnectTimeout => "connect",
            Failure::Local => "local",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Body(_) => "client_body",
            Failure::Other => "other",
        }
    }
}

/// The retry decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    replayable: bool,
    max_retries: usize,
}

impl RetryPolicy {
    /// The policy for a request with `method`, with or without a body, to a pool that allows
    /// `max_retries` retries.
    pub(crate) fn new(method: &Method, body_empty: bool, max_retries: u32) -> RetryPolicy {
        let idempotent = matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        RetryPolicy {
            replayable: idempotent && body_empty,
            max_retries: max_retries as usize,
        }
    }

    /// Whether the request can be sent again (each attempt then gets an empty body and a
    /// copy of the headers).
    pub(crate) fn replayable(self) -> bool {
        self.replayable
    }

    /// Whether a failure of attempt number `attempt` (1 for the first) could be retried at
    /// all; when not, the attempt may consume the request's headers.
    pub(crate) fn may_retry(self, attempt: usize) -> bool {
        self.replayable && attempt <= self.max_retries
    }

    /// Whether attempt number `attempt`, failed with `failure`, is retried (budget permitting).
    pub(crate) fn retries(self, attempt: usize, failure: Failure) -> bool {
        self.may_retry(attempt)
            && matches!(
                failure,
                Failure::Connect | Failure::ConnectTimeout | Failure::Reset
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_requests_without_a_body_are_replayable() {
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            let m: Method = m.parse().unwrap();
            assert!(RetryPolicy::new(&m, true, 2).replayable(), "{m}");
            assert!(
                !RetryPolicy::new(&m, false, 2).replayable(),
                "{m} with a body"
            );
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            let m: Method = m.parse().unwrap();
            assert!(!RetryPolicy::new(&m, true, 2).replayable(), "{m}");
        }
    }

    #[test]
    fn connect_failures_and_resets_are_retried_up_to_max_retries() {
        let p = RetryPolicy::new(&Method::GET, true, 2);
        for f in [Failure::Connect, Failure::Reset] {
            assert!(p.retries(1, f));
            assert!(p.retries(2, f));
            assert!(!p.retries(3, f), "max_retries = 2: three attempts at most");
        }
        assert!(!RetryPolicy::new(&Method::GET, true, 0).retries(1, Failure::Connect));
    }

    #[test]
    fn timeouts_client_faults_and_other_failures_are_not_retried() {
        let p = RetryPolicy::new(&Method::GET, true, 10);
        for f in [
            Failure::Timeout,
            Failure::Body(BodyLimitError::Timeout),
            Failure::Other,
        ] {
            assert!(!p.retries(1, f), "{}", f.label());
        }
        let post = RetryPolicy::new(&Method::POST, true, 10);
        assert!(!post.may_retry(1));
        assert!(!post.retries(1, Failure::Connect));
    }
}
