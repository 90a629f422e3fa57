//! Requests per second per user: a token bucket per authenticated user,
//! checked right after authentication (`api.requests_per_second_per_user`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets by user.
#[derive(Debug)]
pub struct UserRateLimiter {
    /// Tokens added per second (0: no limit).
    rate: f64,
    /// Largest burst.
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl UserRateLimiter {
    /// `rate` requests per second on average, bursts of `burst` (at least 1).
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst: burst.max(1.0), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from the user's bucket, or says how long until one
    /// is available.
    pub fn check(&self, user_id: &str) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(user_id.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }

    /// The user is deleted: their bucket goes.
    pub fn forget(&self, user_id: &str) {
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_user() {
        let limiter = UserRateLimiter::new(10.0, 3.0);
        for _ in 0..3 {
            assert!(limiter.check("alice").is_ok());
        }
        let wait = limiter.check("alice").expect_err("burst spent");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        // Another user has their own bucket.
        assert!(limiter.check("bob").is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.check("alice").is_ok());
    }

    #[test]
    fn a_deleted_users_bucket_is_gone() {
        let limiter = UserRateLimiter::new(0.001, 1.0);
        assert!(limiter.check("alice").is_ok());
        assert!(limiter.check("alice").is_err());
        limiter.forget("alice");
        assert!(limiter.buckets.lock().expect("lock").is_empty());
        // A user created again with the id starts with a full bucket.
        assert!(limiter.check("alice").is_ok());
    }

    #[test]
    fn zero_means_no_limit() {
        let limiter = UserRateLimiter::new(0.0, 0.0);
        assert!((0..10_000).all(|_| limiter.check("alice").is_ok()));
    }
}
