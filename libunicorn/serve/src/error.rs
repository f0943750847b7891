//! Errors: what a request gets back (OpenAI's error object with an HTTP status), and what stops
//! the server from starting.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use unicorn::Status;

/// An error answered to an HTTP client as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`...
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault.
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None }
    }

    /// 400: the request is malformed or a parameter is out of range.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            param,
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400: prompt and completion do not fit in the context.
    pub fn context_exceeded(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(Some(param), message)
        }
    }

    /// 404: no served model has this id.
    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model"),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{model}` does not exist (GET /v1/models lists the served ones)"
                ),
            )
        }
    }

    /// 404 for a path no route serves.
    pub fn no_route(path: &str) -> ApiError {
        ApiError {
            code: Some("unknown_url"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unknown request URL: {path}"),
            )
        }
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "this method is not allowed on this URL",
        )
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized() -> ApiError {
        ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "Incorrect or missing API key: send `Authorization: Bearer <key>`",
            )
        }
    }

    /// 413: the body is over the server's limit.
    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than this server accepts ({limit} bytes)"),
        )
    }

    /// 429: every slot and the queue are taken.
    pub fn busy() -> ApiError {
        ApiError {
            code: Some("rate_limit_exceeded"),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "the server has as many requests running and waiting as it takes; retry later",
            )
        }
    }

    /// 503: the daemon cannot be reached or refuses the work.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Some("daemon_unavailable"),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        }
    }

    /// 500: a failure of the server or the daemon that the client did not cause.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The error object OpenAI's clients parse.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<unicorn::Error> for ApiError {
    fn from(e: unicorn::Error) -> ApiError {
        match e.status() {
            Status::NoDaemon
            | Status::Disconnected
            | Status::Timeout
            | Status::PermissionDenied => ApiError::unavailable(format!("unicornd: {e}")),
            // The daemon's quotas (contexts, KV positions of this user): busy, not broken.
            Status::LimitExceeded => ApiError::unavailable(format!("unicornd is at a limit: {e}")),
            _ => ApiError::internal(format!("unicornd: {e}")),
        }
    }
}

impl From<unicorn_generate::Error> for ApiError {
    fn from(e: unicorn_generate::Error) -> ApiError {
        use unicorn_generate::Error as G;
        match e {
            G::Client(e) | G::Load { source: e, .. } => e.into(),
            // The chat template refused the conversation (e.g. roles out of order).
            G::Template(m) => ApiError::invalid(Some("messages"), m),
            G::EmptyPrompt => ApiError::invalid(Some("prompt"), "the prompt has no tokens"),
            other => ApiError::internal(other.to_string()),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error("binding {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    Generate(#[from] unicorn_generate::Error),
    #[error("unicornd: {0}")]
    Daemon(#[from] unicorn::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_objects_have_openai_shape_and_status() {
        let e = ApiError::invalid(Some("temperature"), "too hot");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body(),
            serde_json::json!({"error": {"message": "too hot", "type": "invalid_request_error",
                "param": "temperature", "code": null}})
        );
        assert_eq!(ApiError::model_not_found("x").status, StatusCode::NOT_FOUND);
        assert_eq!(ApiError::unauthorized().status, StatusCode::UNAUTHORIZED);
        assert_eq!(ApiError::too_large(1).status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ApiError::busy().status, StatusCode::TOO_MANY_REQUESTS);
        let gone = ApiError::from(unicorn::Error::new(Status::Disconnected, "bye"));
        assert_eq!(gone.status, StatusCode::SERVICE_UNAVAILABLE);
        let ctx = ApiError::context_exceeded("messages", "long");
        assert_eq!(ctx.body()["error"]["code"], "context_length_exceeded");
    }
}
