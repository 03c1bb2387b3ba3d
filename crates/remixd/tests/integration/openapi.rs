//! `GET /openapi.json` (API.md §8): an OpenAPI 3.1 document, generated from the code, of
//! every endpoint; every documented operation is routed. `scripts/schemathesis.sh` checks
//! the server's answers against it.

use crate::common;

use std::collections::BTreeSet;

use common::TestServer;
use serde_json::Value;

/// Every route of the router: (method, path as OpenAPI writes it, needs the bearer key).
const ENDPOINTS: [(&str, &str, bool); 14] = [
    ("post", "/api/v1/jobs/createTask", true),
    ("get", "/api/v1/jobs/recordInfo", true),
    ("post", "/api/v1/jobs/cancel", true),
    ("get", "/api/v1/jobs/stream", true),
    ("get", "/api/v1/jobs/list", true),
    ("get", "/api/v1/chat/credit", true),
    ("post", "/api/v1/common/download-url", true),
    ("post", "/api/file-stream-upload", true),
    ("post", "/api/file-url-upload", true),
    ("post", "/api/file-base64-upload", true),
    ("get", "/healthz", false),
    ("get", "/readyz", false),
    ("get", "/files/{key}", false),
    ("get", "/openapi.json", false),
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Fetches the document without any credentials: it is public.
async fn document(srv: &TestServer) -> Value {
    let r = reqwest::get(format!("{}/openapi.json", srv.api.base))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "{ct}");
    r.json().await.unwrap()
}

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, _) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                ops.insert((method.clone(), path.clone()));
            }
        }
    }
    ops
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_lists_every_endpoint() {
    let srv = TestServer::start().await;
    let doc = document(&srv).await;

    let version = doc["openapi"].as_str().expect("openapi");
    assert!(version.starts_with("3.1"), "{version}");
    assert_eq!(doc["info"]["title"], "remixd");

    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"].as_str().unwrap().to_lowercase(), "bearer");

    let want: BTreeSet<(String, String)> = ENDPOINTS
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(operations(&doc), want, "documented operations");

    let mut ids = BTreeSet::new();
    for (method, path, auth) in ENDPOINTS {
        let op = &doc["paths"][path][method];
        let id = op["operationId"].as_str().unwrap_or_default().to_string();
        assert!(!id.is_empty(), "{method} {path}: operationId");
        assert!(ids.insert(id.clone()), "{method} {path}: duplicate id {id}");
        let responses = op["responses"].as_object().expect("responses");
        assert!(responses.contains_key("200"), "{method} {path}: 200");
        let security = op["security"].as_array().cloned().unwrap_or_default();
        let bearer = security.iter().any(|s| s.get("bearer").is_some());
        assert_eq!(bearer, auth, "{method} {path}: bearer security");
        if auth {
            let unauthorized = &responses["401"]["content"]["application/json"]["schema"];
            assert!(
                unauthorized["$ref"]
                    .as_str()
                    .is_some_and(|r| r.ends_with("/ErrorEnvelope") || r.ends_with("/Failure")),
                "{method} {path}: 401 in an error envelope: {unauthorized}"
            );
        }
    }

    // The contract's error statuses, on the endpoints that can answer them.
    let create = &doc["paths"]["/api/v1/jobs/createTask"]["post"]["responses"];
    for status in ["401", "402", "403", "422", "429", "500", "503"] {
        assert!(create.get(status).is_some(), "createTask {status}");
    }
    assert!(create["429"]["headers"].get("Retry-After").is_some());
    let record = &doc["paths"]["/api/v1/jobs/recordInfo"]["get"]["responses"];
    for status in ["401", "404", "422", "429"] {
        assert!(record.get(status).is_some(), "recordInfo {status}");
    }
    let stream = &doc["paths"]["/api/v1/jobs/stream"]["get"]["responses"]["200"]["content"];
    assert!(stream.get("text/event-stream").is_some(), "{stream}");
    let upload = &doc["paths"]["/api/file-stream-upload"]["post"]["requestBody"]["content"];
    assert!(upload.get("multipart/form-data").is_some(), "{upload}");
    for path in ["/api/file-url-upload", "/api/file-base64-upload"] {
        let body = &doc["paths"][path]["post"]["requestBody"]["content"];
        assert!(body.get("application/json").is_some(), "{path}: {body}");
    }

    // The envelopes.
    let schemas = &doc["components"]["schemas"];
    let error = &schemas["ErrorEnvelope"];
    assert_eq!(error["properties"]["data"]["type"], "null", "{error}");
    for field in ["code", "msg", "data"] {
        assert!(
            error["required"]
                .as_array()
                .unwrap()
                .contains(&field.into()),
            "{field}"
        );
    }
    for field in ["success", "code", "msg", "data"] {
        assert!(
            schemas["UploadOk"]["properties"].get(field).is_some(),
            "UploadOk.{field}"
        );
    }
    let record_data = &schemas["RecordInfo"]["properties"];
    for field in [
        "taskId",
        "model",
        "state",
        "param",
        "resultJson",
        "failCode",
        "failMsg",
        "costTime",
        "completeTime",
        "createTime",
        "updateTime",
        "creditsConsumed",
        "progress",
    ] {
        assert!(record_data.get(field).is_some(), "RecordInfo.{field}");
    }
    srv.stop().await;
}

/// Every documented operation reaches a handler, not the router's fallback, so the
/// document cannot name a route that does not exist.
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let srv = TestServer::start().await;
    let doc = document(&srv).await;
    for (method, path) in operations(&doc) {
        let url = format!(
            "{}{}",
            srv.api.base,
            path.replace("{key}", "results/nothing/here.png")
        );
        let req = match method.as_str() {
            "get" => srv.api.http.get(&url),
            "post" => srv.api.http.post(&url),
            m => panic!("unexpected method {m} for {path}"),
        };
        // No body: nothing is fetched, every handler refuses or answers at once.
        let r = req.bearer_auth(&srv.api.key).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(
            !text.contains("no route for"),
            "{method} {path}: {status} {text}"
        );
        let documented = doc["paths"][&path][&method]["responses"]
            .get(status.to_string())
            .is_some();
        assert!(
            documented,
            "{method} {path}: status {status} is not documented"
        );
    }
    srv.stop().await;
}

/// Answers schemathesis found outside the document, now in it: a file-stream-upload
/// that is not multipart, or repeats a part, and a `/files/` key that is not UTF-8.
#[tokio::test]
async fn framework_rejections_answer_as_documented() {
    let srv = TestServer::start().await;

    let r = srv
        .api
        .http
        .post(format!("{}/api/file-stream-upload", srv.api.base))
        .bearer_auth(&srv.api.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.expect("the upload envelope");
    assert_eq!(body["success"], false);
    assert_eq!(body["code"], 400);
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .starts_with("malformed multipart body"),
        "{body}"
    );

    let png = remixd_testkit::samples::png(8, 8, [1, 2, 3]);
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(png).file_name("a.png"),
        )
        .text("uploadPath", "x")
        .text("fileName", "a.png")
        .text("fileName", "b.png");
    let r = srv
        .api
        .http
        .post(format!("{}/api/file-stream-upload", srv.api.base))
        .bearer_auth(&srv.api.key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["msg"], "fileName is given more than once", "{body}");

    let r = srv
        .api
        .http
        .get(format!("{}/files/results/%FF%FE.png", srv.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let body: Value = r.json().await.expect("the error envelope");
    assert_eq!(body["code"], 404);
    assert_eq!(body["data"], Value::Null);
    srv.stop().await;
}
