"""Ray Serve's controller details -> per-deployment states (pure part, no cluster)."""

from serving.control.status import AppState, changes, states_from_details

DETAILS = {"applications": {"serving": {
    "status": "DEPLOYING", "message": "",
    "deployments": {
        "router": {"status": "UPDATING", "status_trigger": "CONFIG_UPDATE_STARTED",
                   "message": "Deployment 'router' in application 'serving' has 1 replicas that have taken more than 30s to be scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment to be installed. Resources required for each replica: {\"CPU\": 0.5}, total resources available: {\"CPU\": 0.0}.",
                   "replicas": [{"replica_id": "r1", "state": "PENDING_ALLOCATION", "node_id": None}]},
        "chat": {"status": "HEALTHY", "status_trigger": "CONFIG_UPDATE_COMPLETED", "message": "",
                 "replicas": [{"replica_id": "c1", "state": "RUNNING", "node_id": "n1"},
                              {"replica_id": "c2", "state": "RUNNING", "node_id": "n2"},
                              {"replica_id": "c3", "state": "STARTING", "node_id": "n2"}]},
        "bad": {"status": "DEPLOY_FAILED", "status_trigger": "REPLICA_STARTUP_FAILED",
                "message": "The deployment failed to start 3 times in a row. ... ValueError: no such model",
                "replicas": []},
    }}}}


def test_states_carry_status_message_and_replica_counts():
    app = states_from_details(DETAILS, "serving")
    assert app.status == "DEPLOYING"
    router, chat, bad = app.deployments["router"], app.deployments["chat"], app.deployments["bad"]
    assert router.status == "UPDATING" and "taken more than 30s to be scheduled" in router.message
    assert router.replicas == {"PENDING_ALLOCATION": 1} and router.running == 0
    assert chat.replicas == {"RUNNING": 2, "STARTING": 1} and chat.running == 2
    assert chat.replica_nodes == {"c1": "n1", "c2": "n2"}
    assert bad.failed and bad.trigger == "REPLICA_STARTUP_FAILED" and "ValueError: no such model" in bad.line()
    assert not chat.failed


def test_missing_application_is_not_started():
    app = states_from_details({"applications": {}}, "serving")
    assert app == AppState("NOT_STARTED", "no application 'serving' on this Ray cluster", {})


def test_changes_prints_only_what_changed():
    app = states_from_details(DETAILS, "serving")
    seen, lines = changes({}, app)
    assert len(lines) == 4  # application + 3 deployments
    seen, lines = changes(seen, app)
    assert lines == []
    healthy = {**DETAILS["applications"]["serving"]["deployments"]["chat"], "replicas": []}
    details = {"applications": {"serving": {**DETAILS["applications"]["serving"],
                                            "deployments": {**DETAILS["applications"]["serving"]["deployments"], "chat": healthy}}}}
    _, lines = changes(seen, states_from_details(details, "serving"))
    assert lines == ["  chat: HEALTHY (no replicas)"]


def test_per_model_applications_fold_into_the_stacks_states():
    """`serving up --per-model-apps` (the Helm chart's shape): each model's deployment is in its own
    application; the stack's view lists it (not its ingress stub), and a model whose builder failed
    shows the application's error."""
    details = {"applications": {
        "serving": {"status": "RUNNING", "message": "", "deployments": {"router": {"status": "HEALTHY", "replicas": []}}},
        "serving.chat": {"status": "RUNNING", "message": "", "deployments": {
            "chat": {"status": "HEALTHY", "replicas": [{"replica_id": "c1", "state": "RUNNING"}]},
            "ingress": {"status": "HEALTHY", "replicas": []}}},
        "serving.broken": {"status": "DEPLOY_FAILED", "message": "Deploying app 'serving.broken' failed: ValueError",
                           "deployments": {}},
        "other": {"status": "RUNNING", "message": "", "deployments": {"x": {"status": "HEALTHY", "replicas": []}}},
    }}
    app = states_from_details(details, "serving")
    assert set(app.deployments) == {"router", "chat", "broken"}
    assert app.deployments["chat"].running == 1
    assert app.deployments["broken"].failed and "ValueError" in app.deployments["broken"].message
