//! CSI Identity: who the plugin is, what it offers, whether it is ready. Nothing here touches
//! a pool or makes a blocking call: these answers must come in milliseconds whatever the
//! storage is doing (liveness probes and registrars depend on them).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::driver::{DRIVER_NAME, Driver};
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service, volume_expansion};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse, PluginCapability,
    ProbeRequest, ProbeResponse,
};

/// The Identity service.
pub struct IdentityService {
    driver: Arc<Driver>,
    /// issue 12: whether the GroupController service is served beside it.
    group_controller: bool,
    /// Whether this socket serves the Controller service (an agent's plugin socket does not).
    controller: bool,
}

impl IdentityService {
    /// Serves identity for `driver`, with the Controller service.
    pub fn new(driver: Arc<Driver>) -> Self {
        IdentityService { driver, group_controller: false, controller: true }
    }

    /// issue 12: advertise GROUP_CONTROLLER_SERVICE (where the GroupController is served).
    pub fn with_group_controller(mut self, served: bool) -> Self {
        self.group_controller = served;
        self
    }

    // issue 11: cluster
    /// Whether the Controller service is served beside it (advertised only then).
    pub fn with_controller(self, controller: bool) -> Self {
        IdentityService { controller, ..self }
    }
}

fn service_cap(t: service::Type) -> PluginCapability {
    PluginCapability { r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(&self, _: Request<GetPluginInfoRequest>) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: [
                ("pools".to_owned(), self.driver.pools.keys().cloned().collect::<Vec<_>>().join(",")),
                ("commit".to_owned(), crate::GIT_COMMIT.to_owned()),
            ]
            .into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let online = PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        };
        let controller = self.controller.then(|| service_cap(service::Type::ControllerService));
        let group = self.group_controller.then(|| service_cap(service::Type::GroupControllerService));
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: controller
                .into_iter()
                .chain([service_cap(service::Type::VolumeAccessibilityConstraints), online])
                .chain(group)
                .collect(),
        }))
    }

    /// Ready whenever it answers: the socket only appears once every pool is open (start-up
    /// opens them before serving), and a pool's later sickness is reported through volume
    /// conditions and the log (`crate::csi::HealthLog`), never here, since a not-ready Probe
    /// makes the liveness probe restart the plugin, which cures no pool.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
