//! Managed Redis often speaks TLS only: a `rediss://` URL works through the same pool and shared
//! connection every component uses.

use fanout_core::redis::{SharedConnection, pool};
use fanout_test_support::{RedisServer, test_config};

#[tokio::test]
async fn a_rediss_url_connects_over_tls() {
    let redis = RedisServer::start_tls();
    let config = test_config(&redis.url(), &[]);
    assert!(config.redis.url.starts_with("rediss://"));
    let shared = SharedConnection::new(pool(&config.redis).expect("pool"));
    let mut conn = shared.get().await.expect("tls connection");
    let () = redis::cmd("SET")
        .arg("k")
        .arg("over tls")
        .query_async(&mut conn)
        .await
        .expect("set");
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(v, "over tls");
    // A plain-text client cannot talk to it: the URL's scheme is what selects TLS.
    let plain = redis.url().replace("rediss://", "redis://");
    let config = test_config(&plain, &[]);
    let shared = SharedConnection::new(pool(&config.redis).expect("pool"));
    let failed = match shared.get().await {
        Err(_) => true,
        Ok(mut c) => redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_err(),
    };
    assert!(failed);
}
