"""One real cheap node through SkyPilot's SDK (costs cents): launched, recorded, reconciled, torn down.
Runs only with credentials and THUNDEROPS_CLOUD_TESTS=1 (the `cloud` marker); stops SkyPilot's local API
server afterwards (`sky api stop`)."""

from __future__ import annotations

import pytest
from provision_helpers import plan_of

from thunderops.catalog import load_offers
from thunderops.provision.sky_adapter import SkyPilotSDK
from thunderops.provision.skypilot import SkyPilotProvider
from thunderops.state import Store

pytestmark = pytest.mark.cloud


@pytest.fixture
def sdk():
    cloud = SkyPilotSDK()
    yield cloud
    import sky

    sky.api_stop()  # `sky api stop`: the SDK's local API server holds 1-2 GiB


def test_one_real_cheap_node_up_and_down(sdk):
    enabled = sdk.enabled_clouds()
    offers = load_offers()
    offers = offers[offers["cloud"].isin(enabled)]
    if offers.empty:
        pytest.skip(f"none of our catalog's clouds is enabled in SkyPilot ({sorted(enabled)})")
    row = offers.sort_values("price_ondemand").iloc[0]
    plan = plan_of([("cheap", row, False)], slack=0.5)
    plan.groups = []  # no engines: this checks the machine, not vLLM
    store = Store()
    store.create_deployment("cloudtest", provider="skypilot", budget_per_hour=plan.budget_per_hour)
    # no pip_spec: the node installs a wheel of this thunderops, shipped by file_mounts, as `up` does
    p = SkyPilotProvider(store, sdk, launch_timeout_s=1200)
    try:
        result = p.up("cloudtest", plan)
        assert result.ok, result.message
        assert result.nodes[0].host
        assert set(p.clusters("cloudtest")) == {result.nodes[0].cluster_name}
        assert p.package("cloudtest").is_file()  # the wheel its setup installed
    finally:
        p.down("cloudtest")
    assert p.clusters("cloudtest") == {}
