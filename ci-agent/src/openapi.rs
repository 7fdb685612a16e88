//! The OpenAPI 3.1 description of the agent's HTTP interface (what the
//! server calls), served at `GET /openapi.json`. The server's own document
//! covers the other half of the agent protocol.

use serde_json::{json, Value};

/// Every operation the agent serves, as (method, path).
pub const OPERATIONS: &[(&str, &str)] = &[
    ("post", "/build"),
    ("post", "/cancel"),
    ("get", "/healthz"),
    ("get", "/openapi.json"),
];

/// The document.
pub fn spec() -> Value {
    let error = |d: &str| json!({ "description": d, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "ci-agent", "version": env!("CARGO_PKG_VERSION"),
                  "description": "What the server calls on an agent. The token applies when AGENT_TOKEN is set." },
        "paths": {
            "/build": { "post": {
                "summary": "Run a build in the background", "operationId": "build",
                "security": [{ "agentToken": [] }, {}],
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/BuildRequest" } } } },
                "responses": {
                    "200": { "description": "Accepted; the build runs in the background",
                             "content": { "application/json": { "schema": { "type": "object", "required": ["accepted"], "properties": { "accepted": { "const": true } } } } } },
                    "400": error("Invalid request (repository scheme, ref, empty command)"),
                    "401": error("Missing or wrong agent token"),
                    "403": error("No agent token is set and the request is not from the server's address"),
                    "409": error("Every slot (CAPACITY) is busy, or dispatched to another registration of this agent"),
                    "413": error("Body too large")
                }
            } },
            "/cancel": { "post": {
                "summary": "Stop a build; answers once its work is dead", "operationId": "cancel",
                "security": [{ "agentToken": [] }, {}],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["id"],
                    "properties": { "id": { "type": "integer" }, "attempt": { "type": "integer", "minimum": 0 } }
                } } } },
                "responses": {
                    "200": { "description": "Whether it was running here",
                             "content": { "application/json": { "schema": { "type": "object", "required": ["stopped"], "properties": { "stopped": { "type": "boolean" } } } } } },
                    "400": error("Invalid request"),
                    "401": error("Missing or wrong agent token"),
                    "403": error("No agent token is set and the request is not from the server's address")
                }
            } },
            "/healthz": { "get": {
                "summary": "Liveness and current builds", "operationId": "healthz",
                "responses": { "200": { "description": "Alive", "content": { "application/json": { "schema": {
                    "type": "object", "required": ["status", "id", "build", "builds", "steps"],
                    "properties": {
                        "status": { "const": "ok" },
                        "id": { "type": ["integer", "null"], "description": "Its registration, once registered" },
                        "build": { "type": ["integer", "null"], "description": "One build it runs (the lowest id), for the original single-build view" },
                        "builds": { "type": "array", "items": { "type": "integer" }, "description": "Every build it runs (up to CAPACITY), by the ids its server sent" },
                        "steps": { "type": "array", "items": { "type": "integer" }, "description": "The same, by step id (the server's `stepId`, else the id it sent)" }
                    }
                } } } } }
            } },
            "/openapi.json": { "get": {
                "summary": "This document", "operationId": "openapi",
                "responses": { "200": { "description": "OpenAPI 3.1", "content": { "application/json": { "schema": { "type": "object" } } } } }
            } }
        },
        "components": {
            "securitySchemes": { "agentToken": { "type": "http", "scheme": "bearer", "description": "AGENT_TOKEN" } },
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
                "BuildRequest": {
                    "type": "object", "required": ["id", "command", "hash", "repo"],
                    "properties": {
                        "id": { "type": "integer" },
                        "command": { "type": "string" },
                        "hash": { "type": "string" },
                        "repo": { "type": "string" },
                        "attempt": { "type": "integer", "minimum": 0, "maximum": u32::MAX },
                        "image": { "type": "string" },
                        "timeoutMs": { "type": "integer", "minimum": 1 },
                        "agentId": { "type": "integer", "description": "The registration this was dispatched to; the agent waits until it knows it" },
                        "build": { "type": "integer", "description": "The build the step belongs to (`id` names the step)" },
                        "step": { "type": "string", "description": "The step's name" },
                        "services": {
                            "type": "array", "maxItems": ci_core::model::limits::MAX_SERVICES,
                            "description": "Containers to run beside the step on a network of its own, reachable by name (Docker runner)",
                            "items": {
                                "type": "object", "required": ["name", "image"],
                                "properties": {
                                    "name": { "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9-]{0,62}$" },
                                    "image": { "type": "string" },
                                    "env": { "type": "object", "additionalProperties": { "type": "string" } },
                                    "command": { "type": "array", "items": { "type": "string" } }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}
