//! The OpenAPI 3.1 description of the server's HTTP interface: the user API
//! and the agent protocol. Served at `GET /api/openapi.json`; the tests check
//! it against the routes, and `scripts/fuzz-api` fuzzes the server from it.

use serde_json::{json, Value};

use ci_core::coordinator::MAX_HAND_BACKS;
use ci_core::model::Labels;
use ci_core::protocol::NotifyAgent;

use crate::api::{MAX_BODY, MAX_RESULT_BODY};

/// Every operation the server serves, as (method, OpenAPI path). The
/// description and the router are checked against this list by the tests.
pub const OPERATIONS: &[(&str, &str)] = &[
    ("post", "/api/builds"),
    ("get", "/api/builds"),
    ("get", "/api/builds/{id}"),
    ("get", "/api/builds/{id}/log"),
    ("get", "/api/builds/{id}/steps/{step}/log"),
    ("post", "/api/builds/{id}/cancel"),
    ("post", "/api/builds/{id}/rebuild"),
    ("post", "/api/builds/{id}/retry"),
    ("get", "/api/agents"),
    ("delete", "/api/agents/{id}"),
    ("get", "/metrics"),
    ("post", "/notify_build_log"),
    ("post", "/notify_agent_leave"),
    ("post", "/notify_build_handback"),
    ("get", "/api/openapi.json"),
    ("get", "/healthz"),
    ("post", "/build"),
    ("post", "/notify_agent"),
    ("post", "/notify_agent_alive"),
    ("post", "/notify_build_result"),
];

/// The methods served at `path` (upper case), matching `{param}` segments
/// of the operation paths against any non-empty segment.
pub fn allowed_methods(path: &str) -> Vec<String> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    OPERATIONS
        .iter()
        .filter(|(_, template)| {
            let t: Vec<&str> = template.trim_start_matches('/').split('/').collect();
            t.len() == segs.len()
                && t.iter()
                    .zip(&segs)
                    .all(|(t, s)| if t.starts_with('{') { !s.is_empty() } else { t == s })
        })
        .map(|(m, _)| m.to_ascii_uppercase())
        .collect()
}

/// What `host` may be when an agent registers; mirrors the server's check.
const HOST_PATTERN: &str = concat!(
    r"^(([Hh][Tt][Tt][Pp][Ss]?)://)?",
    r"([A-Za-z0-9.][A-Za-z0-9.-]*|\[(",
    // IPv6, the forms std::net::Ipv6Addr parses.
    r"([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}|",
    r"([0-9A-Fa-f]{1,4}:){1,7}:|",
    r"([0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}|",
    r"([0-9A-Fa-f]{1,4}:){1,5}(:[0-9A-Fa-f]{1,4}){1,2}|",
    r"([0-9A-Fa-f]{1,4}:){1,4}(:[0-9A-Fa-f]{1,4}){1,3}|",
    r"([0-9A-Fa-f]{1,4}:){1,3}(:[0-9A-Fa-f]{1,4}){1,4}|",
    r"([0-9A-Fa-f]{1,4}:){1,2}(:[0-9A-Fa-f]{1,4}){1,5}|",
    r"[0-9A-Fa-f]{1,4}:(:[0-9A-Fa-f]{1,4}){1,6}|",
    r":((:[0-9A-Fa-f]{1,4}){1,7}|:)",
    r")\])?",
    r"(:0*([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?/?$",
);

/// A form's `timeoutMs`: empty, or 1 to 604800000 (7 days).
const TIMEOUT_PATTERN: &str =
    r"^(0*([1-9][0-9]{0,7}|[1-5][0-9]{8}|60[0-3][0-9]{6}|604[0-7][0-9]{5}|604800000))?$";

fn nullable(t: &str) -> Value {
    json!({ "type": [t, "null"] })
}

fn error(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn ok(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
    })
}

fn body(schema: &str) -> Value {
    json!({
        "required": true,
        "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } }
    })
}

fn id_param() -> Value {
    json!({
        "name": "id", "in": "path", "required": true,
        "schema": { "type": "integer", "minimum": 1, "format": "int64" }
    })
}

/// Common error replies of a JSON-body operation.
fn with_body_errors(mut responses: Value) -> Value {
    let extra = [
        ("400", "Invalid body or value; nothing was stored"),
        ("413", "Body too large"),
        ("415", "Not JSON"),
    ];
    for (code, text) in extra {
        responses[code] = error(text);
    }
    responses
}

/// The document.
pub fn spec() -> Value {
    let build_props = json!({
        "id": { "type": "integer", "format": "int64", "minimum": 1 },
        "hash": { "type": "string" },
        "command": { "type": "string" },
        "repo": { "type": "string" },
        "branch": nullable("string"),
        "image": nullable("string"),
        "timeoutMs": nullable("integer"),
        "status": { "$ref": "#/components/schemas/Status" },
        "agent": nullable("string"),
        "agentId": nullable("integer"),
        "attempt": { "type": "integer", "minimum": 0 },
        "exitCode": nullable("integer"),
        "createdAt": { "type": "string", "format": "date-time" },
        "startedAt": { "type": ["string", "null"], "format": "date-time" },
        "finishedAt": { "type": ["string", "null"], "format": "date-time" },
        "durationMs": nullable("integer"),
        "labels": {
            "type": "array", "items": { "type": "string" },
            "description": "Labels the agent must have, all of them"
        },
        "waiting": {
            "type": ["string", "null"],
            "description": "Why a queued build cannot start yet, when no agent has its labels (`no agent has os=windows`)"
        },
        "steps": {
            "type": "array", "items": { "$ref": "#/components/schemas/Step" },
            "description": "Its steps, each after the steps it depends on"
        }
    });
    let build_required: Vec<&String> = build_props
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    let agent_security = json!([{ "agentToken": [] }, {}]);
    let api_security = json!([{ "apiToken": [] }, {}]);
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ci-server",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The build server's user API and agent protocol. Tokens apply only when \
                the server is configured with API_TOKEN / AGENT_TOKEN. Unknown fields are ignored."
        },
        "tags": [
            { "name": "builds", "description": "The user API" },
            { "name": "agent protocol", "description": "Called by agents" }
        ],
        "paths": {
            "/api/builds": {
                "post": {
                    "tags": ["builds"], "summary": "Create a build", "operationId": "createBuild",
                    "security": api_security,
                    "requestBody": body("CreateBuild"),
                    "responses": with_body_errors(json!({
                        "201": ok("The queued build", "Build"),
                        "401": error("Missing or wrong API token"),
                        "503": error("Storage unavailable; retry")
                    }))
                },
                "get": {
                    "tags": ["builds"], "summary": "List builds, newest first", "operationId": "listBuilds",
                    "security": api_security,
                    "parameters": [
                        { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": ci_core::Page::MAX_LIMIT, "default": 50 } },
                        { "name": "offset", "in": "query", "schema": { "type": "integer", "minimum": 0, "maximum": crate::api::MAX_OFFSET, "default": 0 } },
                        { "name": "before", "in": "query", "description": "Only builds numbered below this (keyset paging: as fast on page 1000 as on page 1)", "schema": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX } }
                    ],
                    "responses": {
                        "200": ok("A page of builds", "BuildList"),
                        "400": error("Invalid limit or offset"),
                        "401": error("Missing or wrong API token"),
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/api/builds/{id}": {
                "get": {
                    "tags": ["builds"], "summary": "One build", "operationId": "getBuild",
                    "security": api_security,
                    "parameters": [id_param()],
                    "responses": {
                        "200": ok("The build", "Build"),
                        "400": error("Invalid id"),
                        "401": error("Missing or wrong API token"),
                        "404": error("No such build"),
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/api/builds/{id}/log": {
                "get": {
                    "tags": ["builds"], "summary": "A build's output", "operationId": "getLog",
                    "security": api_security,
                    "parameters": [
                        id_param(),
                        { "name": "attempt", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": u32::MAX } }
                    ],
                    "responses": {
                        "200": ok("Output of the latest (or the given) attempt", "Log"),
                        "400": error("Invalid id or attempt, or a build of several steps (ask for a step's log)"),
                        "401": error("Missing or wrong API token"),
                        "404": error("No such build or attempt"),
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/api/builds/{id}/steps/{step}/log": {
                "get": {
                    "tags": ["builds"], "summary": "A step's output", "operationId": "getStepLog",
                    "description": "With `follow=1`, Server-Sent Events while the step runs: `stdout`, `stderr`, `attempt`, `end`.",
                    "security": api_security,
                    "parameters": [
                        id_param(),
                        { "name": "step", "in": "path", "required": true, "description": "The step's name, percent-encoded", "schema": { "type": "string", "minLength": 1 } },
                        { "name": "attempt", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": u32::MAX } }
                    ],
                    "responses": {
                        "200": ok("Output of the latest (or the given) attempt", "Log"),
                        "400": error("Invalid id or attempt"),
                        "401": error("Missing or wrong API token"),
                        "404": error("No such build, step or attempt"),
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/api/builds/{id}/retry": {
                "post": {
                    "tags": ["builds"], "summary": "Run the steps of a finished build that did not succeed again", "operationId": "retryBuild",
                    "security": api_security,
                    "parameters": [id_param()],
                    "responses": {
                        "200": ok("The build, running again", "Build"),
                        "400": error("Invalid id"),
                        "401": error("Missing or wrong API token"),
                        "404": error("No such build"),
                        "409": error("The build has not finished, or it succeeded, or its pipeline file could not be read (rebuild it)"),
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/api/builds/{id}/cancel": {
                "post": {
                    "tags": ["builds"], "summary": "Cancel a build: a queued one at once, a running one once its agent stopped it", "operationId": "cancelBuild",
                    "security": api_security,
                    "parameters": [id_param()],
                    "responses": {
                        "200": ok("The canceled build", "Build"),
                        "400": error("Invalid id"),
                        "401": error("Missing or wrong API token"),
                        "404": error("No such build"),
                        "409": error("The build already finished"),
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/api/builds/{id}/rebuild": {
                "post": {
                    "tags": ["builds"], "summary": "A new build of the same commit and command", "operationId": "rebuild",
                    "security": api_security,
                    "parameters": [id_param()],
                    "responses": {
                        "201": ok("The new build", "Build"),
                        "400": error("Invalid id"),
                        "401": error("Missing or wrong API token"),
                        "404": error("No such build"),
                        "503": error("Storage unavailable, or shutting down; retry")
                    }
                }
            },
            "/metrics": {
                "get": {
                    "tags": ["builds"], "summary": "Prometheus metrics", "operationId": "metrics",
                    "responses": {
                        "200": { "description": "Prometheus text format", "content": { "text/plain": { "schema": { "type": "string" } } } },
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/notify_build_log": {
                "post": {
                    "tags": ["agent protocol"], "summary": "Live output of a running attempt (extension)", "operationId": "notifyBuildLog",
                    "security": [{ "agentToken": [], "agentSecret": [] }, { "agentToken": [] }, {}],
                    "requestBody": body("NotifyBuildLog"),
                    "responses": with_body_errors(json!({
                        "200": { "description": "Stored (repeats ignored)", "content": { "application/json": { "schema": { "type": "object", "required": ["stored"], "properties": { "stored": { "type": "integer" } } } } } },
                        "401": error("Missing agent token, or the agent's session secret was not presented"),
                        "404": error("The build is not running"),
                        "409": error("The attempt was superseded, or another agent holds the build"),
                        "503": error("Storage unavailable; retry")
                    }))
                }
            },
            "/notify_build_handback": {
                "post": {
                    "tags": ["agent protocol"], "summary": "Give back an attempt the agent's machinery could not run (extension)", "operationId": "notifyBuildHandback",
                    "description": format!("For an infrastructure failure (container engine, disk), not a failed build: \
                        the build goes back to the queue and the agent gets no work for one lease. After \
                        {MAX_HAND_BACKS} hand-backs of one build, it fails with the last reason."),
                    "security": [{ "agentToken": [], "agentSecret": [] }, { "agentToken": [] }, {}],
                    "requestBody": body("NotifyBuildHandback"),
                    "responses": with_body_errors(json!({
                        "200": { "description": "Requeued (or failed, after too many)", "content": { "application/json": { "schema": { "type": "object" } } } },
                        "401": error("Missing agent token, or the agent's session secret was not presented"),
                        "404": error("No such build"),
                        "409": error("The attempt is not running, or another agent holds it"),
                        "503": error("Storage unavailable; retry")
                    }))
                }
            },
            "/notify_agent_leave": {
                "post": {
                    "tags": ["agent protocol"], "summary": "An agent leaves; what it holds is requeued (extension)", "operationId": "notifyAgentLeave",
                    "security": [{ "agentToken": [], "agentSecret": [] }, { "agentToken": [] }, {}],
                    "requestBody": body("NotifyAgentLeave"),
                    "responses": with_body_errors(json!({
                        "200": { "description": "Gone", "content": { "application/json": { "schema": { "type": "object" } } } },
                        "401": error("Missing agent token, or the agent's session secret was not presented"),
                        "404": error("Unknown agent"),
                        "409": error("agentId does not match the session secret"),
                        "503": error("Storage unavailable; retry")
                    }))
                }
            },
            "/api/agents": {
                "get": {
                    "tags": ["builds"], "summary": "Registered agents", "operationId": "listAgents",
                    "security": api_security,
                    "responses": {
                        "200": {
                            "description": "Every agent",
                            "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Agent" } } } }
                        },
                        "401": error("Missing or wrong API token")
                    }
                }
            },
            "/api/agents/{id}": {
                "delete": {
                    "tags": ["builds"], "summary": "Remove an agent: revoke its own credential, close its connection, requeue its builds", "operationId": "removeAgent",
                    "security": api_security,
                    "parameters": [id_param()],
                    "responses": {
                        "200": {
                            "description": "Removed",
                            "content": { "application/json": { "schema": {
                                "type": "object", "required": ["id", "removed", "revoked"],
                                "properties": {
                                    "id": { "type": "integer" },
                                    "removed": { "const": true },
                                    "revoked": nullable("integer")
                                }
                            } } }
                        },
                        "400": error("Invalid id"),
                        "401": error("Missing or wrong API token"),
                        "404": error("No such agent"),
                        "503": error("Storage unavailable; retry")
                    }
                }
            },
            "/api/openapi.json": {
                "get": {
                    "tags": ["builds"], "summary": "This document", "operationId": "openapi",
                    "responses": { "200": { "description": "OpenAPI 3.1", "content": { "application/json": { "schema": { "type": "object" } } } } }
                }
            },
            "/healthz": {
                "get": {
                    "tags": ["builds"], "summary": "Liveness", "operationId": "healthz",
                    "responses": { "200": {
                        "description": "Alive",
                        "content": { "application/json": { "schema": {
                            "type": "object", "required": ["status"],
                            "properties": { "status": { "const": "ok" } }
                        } } }
                    } }
                }
            },
            "/build": {
                "post": {
                    "tags": ["builds"], "summary": "Create a build (the original UI's form)", "operationId": "createBuildForm",
                    "security": api_security,
                    "requestBody": {
                        "required": true,
                        "content": {
                            "application/json": { "schema": { "$ref": "#/components/schemas/CreateBuild" } },
                            "application/x-www-form-urlencoded": { "schema": { "$ref": "#/components/schemas/CreateBuildForm" } }
                        }
                    },
                    "responses": with_body_errors(json!({
                        "201": ok("The queued build", "Build"),
                        "401": error("Missing or wrong API token"),
                        "503": error("Storage unavailable; retry")
                    }))
                }
            },
            "/notify_agent": {
                "post": {
                    "tags": ["agent protocol"], "summary": "An agent registers", "operationId": "notifyAgent",
                    "description": "An agent restarting at a URL whose session is still live proves it is that \
                        agent with the session's secret in `X-Agent-Secret`; without it, the URL is refused \
                        until the session lapses (one lease without a word from it).",
                    "security": agent_security,
                    "requestBody": body("NotifyAgent"),
                    "responses": with_body_errors(json!({
                        "200": ok("The agent's id and heartbeat interval", "NotifyAgentReply"),
                        "401": error("Missing or wrong agent token"),
                        "409": error("An agent with a live session holds this URL; retry once it lapses"),
                        "503": error("Storage unavailable; retry")
                    }))
                }
            },
            "/notify_agent_alive": {
                "post": {
                    "tags": ["agent protocol"], "summary": "Heartbeat (with `id`) or idle ping (`agentId` only)", "operationId": "notifyAgentAlive",
                    "security": [{ "agentToken": [], "agentSecret": [] }, { "agentToken": [] }, {}],
                    "requestBody": body("NotifyAgentAlive"),
                    "responses": with_body_errors(json!({
                        "200": { "description": "Lease renewed", "content": { "application/json": { "schema": { "type": "object" } } } },
                        "401": error("Missing agent token, or the agent's session secret was not presented"),
                        "404": error("The step is not running, or the agent is unknown (register again)"),
                        "409": error("The attempt was superseded, or another agent holds the build"),
                        "503": error("Storage unavailable; retry")
                    }))
                }
            },
            "/notify_build_result": {
                "post": {
                    "tags": ["agent protocol"], "summary": "A build's result", "operationId": "notifyBuildResult",
                    "description": format!("Bodies up to {MAX_RESULT_BODY} bytes; other requests up to {MAX_BODY}."),
                    "security": [{ "agentToken": [], "agentSecret": [] }, { "agentToken": [] }, {}],
                    "requestBody": body("NotifyBuildResult"),
                    "responses": with_body_errors(json!({
                        "200": { "description": "Stored, or an identical repeat", "content": { "application/json": { "schema": { "type": "object" } } } },
                        "401": error("Missing agent token, or the agent's session secret was not presented"),
                        "404": error("No such build"),
                        "409": error("A superseded attempt, or a different result for a finished build"),
                        "503": error("Storage unavailable; retry")
                    }))
                }
            }
        },
        "components": {
            "securitySchemes": {
                "apiToken": { "type": "http", "scheme": "bearer", "description": "API_TOKEN" },
                "agentToken": { "type": "http", "scheme": "bearer", "description": "AGENT_TOKEN" },
                "agentSecret": { "type": "apiKey", "in": "header", "name": ci_core::auth::SESSION_HEADER, "description": "The session secret from registration" }
            },
            "schemas": {
                "Status": { "type": "string", "enum": ["queued", "running", "success", "failed", "canceled"] },
                "StepStatus": { "type": "string", "enum": ["pending", "queued", "running", "success", "failed", "canceled", "skipped"] },
                "Step": {
                    "type": "object",
                    "required": ["id", "name", "status", "command", "image", "timeoutMs", "agent", "agentId", "attempt", "exitCode", "startedAt", "finishedAt", "durationMs", "dependsOn", "matrix", "labels", "allowFailure", "waiting", "services"],
                    "properties": {
                        "id": { "type": "integer", "description": "The id its agent is sent" },
                        "name": { "type": "string" },
                        "status": { "$ref": "#/components/schemas/StepStatus" },
                        "command": { "type": "string" },
                        "image": nullable("string"),
                        "timeoutMs": nullable("integer"),
                        "agent": nullable("string"),
                        "agentId": nullable("integer"),
                        "attempt": { "type": "integer", "minimum": 0 },
                        "exitCode": nullable("integer"),
                        "startedAt": { "type": ["string", "null"], "format": "date-time" },
                        "finishedAt": { "type": ["string", "null"], "format": "date-time" },
                        "durationMs": nullable("integer"),
                        "dependsOn": { "type": "array", "items": { "type": "string" } },
                        "matrix": { "type": "object", "additionalProperties": { "type": "string" } },
                        "labels": { "type": "array", "items": { "type": "string" } },
                        "allowFailure": { "type": "boolean" },
                        "waiting": { "type": ["string", "null"], "description": "Why it is queued and not running, when no agent has its labels" },
                        "services": { "type": "array", "items": { "$ref": "#/components/schemas/Service" } }
                    }
                },
                "Service": {
                    "type": "object", "required": ["name", "image"],
                    "description": "A container beside a step, on a network of the step's own, reachable by its name (Docker runner)",
                    "properties": {
                        "name": { "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9-]{0,62}$" },
                        "image": { "type": "string" },
                        "env": { "type": "object", "additionalProperties": { "type": "string" } },
                        "command": { "type": "array", "items": { "type": "string" }, "description": "Instead of the image's command" }
                    }
                },
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": { "error": { "type": "string" } }
                },
                "CreateBuild": {
                    "type": "object", "required": ["hash"],
                    "properties": {
                        "hash": {
                            "type": "string",
                            "description": "Hex SHA (4-64 digits) or a ref name: letters, digits, . _ / -, starting with a letter or digit, without '..', '//', '/.', or a trailing '/' or '.'",
                            "maxLength": 255,
                            "pattern": "^[0-9A-Za-z]([0-9A-Za-z_-]|\\.[0-9A-Za-z_-]|\\./[0-9A-Za-z_-]|/[0-9A-Za-z_-])*$"
                        },
                        "command": {
                            "type": ["string", "null"], "maxLength": ci_core::model::limits::MAX_COMMAND, "pattern": "^[^\\u0000]*$",
                            "description": "Empty or absent: the server's BUILD_COMMAND"
                        },
                        "branch": { "type": ["string", "null"], "maxLength": ci_core::model::limits::MAX_BRANCH, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$" },
                        "image": { "type": ["string", "null"], "maxLength": ci_core::model::limits::MAX_IMAGE, "pattern": "^([A-Za-z0-9._/:@][A-Za-z0-9._/:@-]*)?$" },
                        "timeoutMs": { "type": ["integer", "null"], "minimum": 1, "maximum": ci_core::model::limits::MAX_TIMEOUT_MS },
                        "labels": {
                            "type": ["array", "null"], "maxItems": Labels::MAX,
                            "description": "Labels the agent must have, all of them (a label given twice counts once)",
                            "items": { "type": "string", "pattern": "^[A-Za-z0-9._:/=-]{1,64}$" }
                        },
                        "event": {
                            "type": ["string", "null"], "enum": ["manual", "api", null],
                            "description": "What started it, for the pipeline's `when: {event}`: `manual` (a person; `ci submit` says so) or `api` (the default)"
                        }
                    }
                },
                "CreateBuildForm": {
                    "type": "object", "required": ["hash"],
                    "description": "CreateBuild as an HTML form posts it: every value a string, empty means absent",
                    "properties": {
                        "hash": { "$ref": "#/components/schemas/CreateBuild/properties/hash" },
                        "command": { "type": "string", "maxLength": ci_core::model::limits::MAX_COMMAND, "pattern": "^[^\\u0000]*$" },
                        "branch": { "type": "string", "maxLength": ci_core::model::limits::MAX_BRANCH, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$" },
                        "image": { "type": "string", "maxLength": ci_core::model::limits::MAX_IMAGE, "pattern": "^([A-Za-z0-9._/:@][A-Za-z0-9._/:@-]*)?$" },
                        "timeoutMs": { "type": "string", "pattern": TIMEOUT_PATTERN }
                    }
                },
                "Build": {
                    "type": "object", "required": build_required,
                    "properties": build_props
                },
                "BuildList": {
                    "type": "object", "required": ["builds", "limit", "offset"],
                    "properties": {
                        "builds": { "type": "array", "items": { "$ref": "#/components/schemas/Build" } },
                        "limit": { "type": "integer" },
                        "offset": { "type": "integer" }
                    }
                },
                "Log": {
                    "type": "object", "required": ["id", "step", "attempt", "stdout", "stderr", "complete"],
                    "properties": {
                        "id": { "type": "integer" },
                        "step": { "type": "string", "description": "The step's name" },
                        "attempt": { "type": "integer", "minimum": 0 },
                        "stdout": { "type": "string" },
                        "stderr": { "type": "string" },
                        "complete": { "type": "boolean", "description": "The accepted result's log, rather than output streamed while the attempt ran" },
                        "note": { "type": "string", "description": "Where an incomplete log stopped, and why" }
                    }
                },
                "Agent": {
                    "type": "object", "required": ["id", "url", "status", "lastSeen", "build", "builds", "steps", "capacity", "labels"],
                    "properties": {
                        "id": { "type": "integer" },
                        "url": { "type": "string" },
                        "status": { "type": "string", "enum": ["idle", "busy"] },
                        "lastSeen": { "type": "string", "format": "date-time" },
                        "build": nullable("integer"),
                        "builds": { "type": "array", "items": { "type": "integer" }, "description": "The builds of the steps it runs" },
                        "steps": { "type": "array", "items": { "type": "integer" }, "description": "The steps it runs, by the ids agents are sent" },
                        "capacity": { "type": "integer", "minimum": 1 },
                        "labels": { "type": "array", "items": { "type": "string" } },
                        "connected": { "type": "boolean", "description": "It connects out: its connection closing requeues its builds at once" },
                        "address": { "type": "string", "description": "Where its connection comes from" },
                        "version": { "type": "string" },
                        "credential": { "type": "integer", "description": "Its own credential's id" }
                    }
                },
                "NotifyAgent": {
                    "type": "object", "required": ["port"],
                    "properties": {
                        "host": {
                            "type": ["string", "null"],
                            "description": "A host name, IPv4 or [IPv6] address, with or without http(s):// and a :port (the port field wins); empty, absent or 0.0.0.0: the request's source address",
                            "pattern": HOST_PATTERN
                        },
                        "port": { "oneOf": [
                            { "type": "integer", "minimum": 1, "maximum": 65535 },
                            { "type": "string", "pattern": "^0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$" }
                        ] },
                        "session": { "type": "boolean", "description": "Ask for a session secret" },
                        "capacity": { "type": ["integer", "null"], "minimum": 1, "maximum": NotifyAgent::MAX_CAPACITY, "description": "Builds it runs at once (default 1)" },
                        "labels": {
                            "type": ["array", "null"], "maxItems": Labels::MAX,
                            "description": "What it can run (a label given twice counts once)",
                            "items": { "type": "string", "pattern": "^[A-Za-z0-9._:/=-]{1,64}$" }
                        },
                        "pings": { "type": "boolean", "description": "It pings with `agentId` every interval while idle, so silence from registration on means it is gone" }
                    }
                },
                "NotifyBuildLog": {
                    "type": "object", "required": ["id", "pieces"],
                    "properties": {
                        "id": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX },
                        "attempt": { "type": "integer", "minimum": 0, "maximum": u32::MAX },
                        "agentId": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX },
                        "pieces": { "type": "array", "items": {
                            "type": "object", "required": ["seq", "stream", "data"],
                            "properties": {
                                "seq": { "type": "integer", "minimum": 0, "maximum": i64::MAX },
                                "stream": { "type": "string", "enum": ["stdout", "stderr"] },
                                "data": { "type": "string" }
                            }
                        } }
                    }
                },
                "NotifyBuildHandback": {
                    "type": "object", "required": ["id", "attempt", "reason"],
                    "properties": {
                        "id": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX },
                        "attempt": { "type": "integer", "minimum": 0, "maximum": u32::MAX },
                        "agentId": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX },
                        "reason": { "type": "string", "description": "What failed (the first 4,096 characters are kept)" }
                    }
                },
                "NotifyAgentLeave": {
                    "type": "object", "required": ["agentId"],
                    "properties": { "agentId": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX } }
                },
                "NotifyAgentReply": {
                    "type": "object", "required": ["id", "timeout"],
                    "properties": {
                        "id": { "type": "integer" },
                        "timeout": { "type": "integer", "description": "Heartbeat interval, ms" },
                        "secret": { "type": "string" },
                        "extensions": { "type": "boolean", "description": "This server takes the protocol's extensions; a server of the original design says nothing" }
                    }
                },
                "NotifyAgentAlive": {
                    "type": "object",
                    "anyOf": [{ "required": ["id"] }, { "required": ["agentId"] }],
                    "properties": {
                        "id": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX, "description": "The step (the id of its POST /build); absent on an idle ping" },
                        "attempt": { "type": "integer", "minimum": 0, "maximum": u32::MAX },
                        "agentId": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX }
                    }
                },
                "NotifyBuildResult": {
                    "type": "object", "required": ["id", "status"],
                    "properties": {
                        "id": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX },
                        "status": { "type": "integer", "minimum": i32::MIN, "maximum": i32::MAX, "description": "Exit status; 0 is success" },
                        "stdout": { "type": "string" },
                        "stderr": { "type": "string" },
                        "attempt": { "type": "integer", "minimum": 0, "maximum": u32::MAX },
                        "agentId": { "type": "integer", "minimum": i64::MIN, "maximum": i64::MAX }
                    }
                }
            }
        }
    });
    guarded(&mut doc);
    doc
}

/// Adds what the guard (`guard.rs`) may answer before any route: 403 for
/// a `Host` that is not the server's or a cross-origin request, and 415 for
/// a body that is not JSON.
fn guarded(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (method, op) in paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|m| m.iter_mut())
    {
        let responses = &mut op["responses"];
        responses["403"] =
            error("Host is not a name of this server, or the request came from another origin");
        if method == "post" {
            responses["415"] = error("The body is not application/json");
        }
    }
}
