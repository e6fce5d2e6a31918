//! The bearer token check, applied as a layer to every protected route (see `Routes`).

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AdminState;

/// 401 unless the request carries `Authorization: Bearer TOKEN` (when a token is configured).
pub async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
        let presented = given.and_then(|v| v.strip_prefix(b"Bearer ".as_slice()));
        match presented {
            Some(p) if constant_time_eq(p, token.as_bytes()) => {}
            _ => {
                let why = if given.is_none() { "missing bearer token" } else { "wrong bearer token" };
                return ApiError::new(StatusCode::UNAUTHORIZED, why, Some("authorization")).into_response();
            }
        }
    }
    next.run(req).await
}

/// Equal without an early exit: the time taken does not tell how much of a guess was right
/// (only whether its length was).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        // Compare against the token cyclically, so a wrong length still costs a full pass.
        let y = if b.is_empty() { 0 } else { b[i % b.len()] };
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"x", b""));
    }
}
