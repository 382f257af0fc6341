//! Vendor callbacks: the routes a vendor posts to herald (Tencent's failure
//! callback, say), behind the vendor seam.
//!
//! A vendor that has one sets [`VendorSpec::callback`](crate::vendor::VendorSpec)
//! to its [`CallbackSpec`]; the route, its checks and what it publishes live in
//! the vendor's own module. The worker serves every vendor's route its accounts
//! take, on `http.listen` or apart on `http.callback_listen`, and lends them the
//! session's publisher.

use std::sync::Arc;

use axum::Router;

use crate::broker::{Publisher, PublisherSlot};
use crate::config::{AccountConfig, Config};
use crate::http::Route;
use crate::vendor::VENDORS;

/// One vendor's callback route.
pub struct CallbackSpec {
    /// The route and every status it answers (one of [`crate::http::routes`]).
    pub route: &'static Route,
    /// Whether `account` (of this vendor) takes callbacks: its series of
    /// `herald_callbacks_total` exist from start-up.
    pub takes_callbacks: fn(&AccountConfig) -> bool,
    /// The route's router for the accounts of `config` that take callbacks,
    /// `None` when none does. It publishes through `publisher`, which holds
    /// the session's publisher while the worker is connected.
    pub router: fn(&Config, Arc<PublisherSlot>) -> anyhow::Result<Option<Router>>,
}

/// Every callback route a worker's config serves, and the publisher they share.
pub struct Callbacks {
    router: Router,
    paths: Vec<&'static str>,
    publisher: Arc<PublisherSlot>,
}

impl Callbacks {
    /// `None` when no account takes callbacks: no callback route is served.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        let publisher = Arc::new(PublisherSlot::default());
        let mut served: Option<Router> = None;
        let mut paths = Vec::new();
        for spec in VENDORS.iter().filter_map(|v| v.callback) {
            if let Some(router) = (spec.router)(config, Arc::clone(&publisher))? {
                served = Some(match served {
                    Some(all) => all.merge(router),
                    None => router,
                });
                paths.push(spec.route.path);
            }
        }
        Ok(served.map(|router| Self {
            router,
            paths,
            publisher,
        }))
    }

    /// The routes, for a listener.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The paths served, for the log line that names a listener's routes.
    pub fn paths(&self) -> &[&'static str] {
        &self.paths
    }

    pub fn set_publisher(&self, publisher: Option<Publisher>) {
        self.publisher.set(publisher);
    }
}

/// Whether `account` takes its vendor's callbacks.
pub fn takes_callbacks(account: &AccountConfig) -> bool {
    crate::vendor::spec(&account.vendor)
        .ok()
        .and_then(|spec| spec.callback)
        .is_some_and(|callback| (callback.takes_callbacks)(account))
}
