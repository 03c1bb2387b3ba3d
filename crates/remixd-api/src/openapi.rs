//! `GET /openapi.json`: the OpenAPI 3.1 document of every endpoint of [`crate::router`].
//!
//! Generated from the code with `utoipa`: each handler carries its `#[utoipa::path]`,
//! the response types derive `ToSchema` where they are defined, and the error responses
//! come from the one error table ([`crate::error::http_status_for`]). The request bodies
//! are parsed by hand ([`crate::validate`], [`crate::uploads`]) so that messages name the
//! field the way the contract does; the body types below only describe them.
//!
//! The integration test `crates/remixd/tests/integration/openapi.rs` checks that every route is
//! documented and every documented operation is routed; `scripts/schemathesis.sh` checks
//! the running server's answers against the document.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

use crate::error::http_status_for;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "remixd",
        description = "The hosted Market task API for `ideogram/character-remix`, self-hosted. \
            Every JSON response of the task API is the envelope `{code, msg, data}`; `data` is \
            `null` on every error and the body `code` is authoritative. Uploads answer in their \
            own envelope `{success, code, msg, data}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        crate::handlers::create_task,
        crate::handlers::record_info,
        crate::handlers::cancel,
        crate::handlers::stream,
        crate::handlers::list,
        crate::handlers::credit,
        crate::uploads::download_url,
        crate::uploads::stream_upload,
        crate::uploads::url_upload,
        crate::uploads::base64_upload,
        crate::handlers::healthz,
        crate::handlers::readyz,
        crate::handlers::file,
        openapi_json,
    ),
    components(schemas(
        crate::error::ErrorEnvelope,
        crate::uploads::Failure,
        crate::wire::RecordInfo,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Create, query, follow and cancel tasks."),
        (name = "account", description = "Credits and signed download links."),
        (name = "uploads", description = "File uploads, kept 24 h; their downloadUrl can be a task input."),
        (name = "files", description = "Result and upload files."),
        (name = "health", description = "Liveness, readiness and this document."),
    ),
)]
pub struct ApiDoc;

/// The `bearer` security scheme: `Authorization: Bearer <key>`.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key of this server: `Authorization: Bearer <key>`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as JSON, built once.
pub fn document_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serialises")
    })
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document of every endpoint.", content_type = "application/json", body = Object)),
    security(()),
)]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

// ---- request bodies and parameters (documentation of hand-written parsing) ----

/// The `taskId` query parameter.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code, non_snake_case)]
pub struct TaskIdQuery {
    /// The task id createTask answered with. An unknown id, or a task of another account,
    /// is a 404; a missing one a 422.
    taskId: String,
}

/// createTask's body. Unknown fields are ignored.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct CreateTaskRequest {
    /// Exactly `ideogram/character-remix`.
    #[schema(schema_with = model_schema)]
    model: String,
    /// An http or https URL (at most 2048 characters) that is POSTed the task when it is terminal.
    #[schema(max_length = 2048, required = false, nullable = false)]
    call_back_url: Option<String>,
    input: CreateTaskInput,
}

fn model_schema() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([remixd_domain::MODEL_NAME]))
        .build()
}

/// createTask's `input`. Empty strings for optional fields mean "not given".
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct CreateTaskInput {
    /// 1 to 5000 characters.
    #[schema(min_length = 1, max_length = 5000)]
    prompt: String,
    /// An http or https URL of the base image: JPEG, PNG or WebP, at most 10 MB.
    image_url: String,
    /// At least one URL; only the first (the character reference) is used.
    #[schema(min_items = 1)]
    reference_image_urls: Vec<String>,
    /// `TURBO`, `BALANCED` (default) or `QUALITY`.
    #[schema(value_type = Option<String>, required = false, nullable = false)]
    rendering_speed: Option<String>,
    /// `AUTO` (default), `REALISTIC` or `FICTION`.
    #[schema(value_type = Option<String>, required = false, nullable = false)]
    style: Option<String>,
    /// Prompt expansion ("MagicPrompt"); default `true`.
    #[schema(required = false, nullable = false)]
    expand_prompt: Option<bool>,
    /// `square`, `square_hd` (default), `portrait_4_3`, `portrait_16_9`, `landscape_4_3` or `landscape_16_9`.
    #[schema(value_type = Option<String>, required = false, nullable = false)]
    image_size: Option<String>,
    /// `"1"` (default) to `"4"`; the integers 1 to 4 are accepted too.
    #[schema(schema_with = num_images_schema, required = false)]
    num_images: Option<String>,
    /// 0 to 2147483647; random when absent.
    #[schema(minimum = 0, maximum = 2147483647, required = false, nullable = false)]
    seed: Option<i64>,
    /// 0.1 to 1 (default 0.8): how strongly the base image shapes the result.
    #[schema(minimum = 0.1, maximum = 1.0, required = false, nullable = false)]
    strength: Option<f64>,
    /// At most 500 characters.
    #[schema(max_length = 500, required = false, nullable = false)]
    negative_prompt: Option<String>,
    /// Style reference images, at most 10.
    #[schema(max_items = 10, required = false, nullable = false)]
    image_urls: Option<Vec<String>>,
    /// One mask for the character reference (white = character); an array is accepted
    /// too, and only its first item is used.
    #[schema(schema_with = mask_schema, required = false)]
    reference_mask_urls: Option<String>,
}

fn num_images_schema() -> utoipa::openapi::schema::Schema {
    utoipa::openapi::schema::OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(["1", "2", "3", "4"])),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(4)),
        )
        .build()
        .into()
}

fn mask_schema() -> utoipa::openapi::schema::Schema {
    utoipa::openapi::schema::OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(
            utoipa::openapi::schema::ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::String)),
        )
        .build()
        .into()
}

/// One Server-Sent Event of the stream endpoint.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct TaskEvent {
    /// Always `task`.
    #[schema(schema_with = task_event_name)]
    event: String,
    /// The recordInfo object (see `RecordInfo`), as JSON.
    #[schema(schema_with = task_event_data)]
    data: String,
}

fn task_event_name() -> utoipa::openapi::schema::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["task"]))
        .build()
}

fn task_event_data() -> utoipa::openapi::schema::Object {
    // `contentSchema` (JSON Schema 2020-12) has no builder method; it is not an `x-` extension.
    let content_schema: utoipa::openapi::extensions::Extensions = [(
        "contentSchema",
        serde_json::json!({"$ref": "#/components/schemas/RecordInfo"}),
    )]
    .into_iter()
    .collect();
    ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .extensions(Some(content_schema))
        .build()
}

/// download-url's body.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct DownloadUrlRequest {
    /// A result or upload URL of this server; any other URL is a 422.
    url: String,
}

/// file-stream-upload's multipart form.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct StreamUploadForm {
    /// The file: JPEG, PNG or WebP (the type comes from the bytes), at most 10 MB by default.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    file: Vec<u8>,
    /// Relative: segments of letters, digits, `.`, `_` and `-` (not `.` or `..`), no
    /// leading or trailing slash, at most 200 characters.
    #[schema(pattern = "^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", max_length = 200)]
    upload_path: String,
    /// Made safe; a random name when absent.
    #[schema(required = false, nullable = false)]
    file_name: Option<String>,
}

/// file-url-upload's body.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct UrlUploadRequest {
    /// An http or https URL of a JPEG, PNG or WebP image.
    file_url: String,
    /// Relative: segments of letters, digits, `.`, `_` and `-` (not `.` or `..`), no
    /// leading or trailing slash, at most 200 characters.
    #[schema(pattern = "^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", max_length = 200)]
    upload_path: String,
    /// Made safe; taken from the URL when absent.
    #[schema(required = false, nullable = false)]
    file_name: Option<String>,
}

/// file-base64-upload's body.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub struct Base64UploadRequest {
    /// Plain base64 or a `data:<mime>;base64,` URL.
    base64_data: String,
    /// Relative: segments of letters, digits, `.`, `_` and `-` (not `.` or `..`), no
    /// leading or trailing slash, at most 200 characters.
    #[schema(pattern = "^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", max_length = 200)]
    upload_path: String,
    /// Made safe; a random name when absent.
    #[schema(required = false, nullable = false)]
    file_name: Option<String>,
}

// ---- error responses, from the one error table ----

/// What an envelope code means, for the response descriptions.
fn meaning(code: u16) -> &'static str {
    match code {
        400 => "bad request: a missing or invalid parameter, a malformed body, an unsupported file type",
        401 => "unauthorized: missing or malformed `Authorization: Bearer <key>`, unknown or revoked key",
        402 => "insufficient credits",
        403 => "the endpoint is disabled on this server",
        404 => "not found",
        413 => "too large (for uploads: the file, or the account's upload quota)",
        422 => "validation error; msg names the field",
        429 => "rate limited",
        433 => "the key's own usage cap is reached",
        455 => "maintenance: task creation is paused",
        500 => "internal error",
        505 => "the endpoint is disabled on this server",
        _ => "error",
    }
}

/// Error responses in the task API's envelope for these envelope codes, keyed by the
/// HTTP status each maps to (mirror mode).
fn envelope_errors(codes: &[u16]) -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
    let mut by_status: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for &code in codes {
        by_status
            .entry(http_status_for(code).as_u16())
            .or_default()
            .push(format!("code {code}: {}", meaning(code)));
    }
    by_status
        .into_iter()
        .map(|(status, lines)| {
            let description = format!("Error envelope, `data` null. {}.", lines.join("; "));
            (
                status.to_string(),
                error_response(status, description, "ErrorEnvelope"),
            )
        })
        .collect()
}

fn error_response(
    status: u16,
    description: String,
    schema: &str,
) -> RefOr<utoipa::openapi::response::Response> {
    let mut r = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name(schema)))
            .build(),
    );
    if matches!(status, 429 | 503) {
        r = r.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                )
                .description(Some("Seconds to wait before trying again."))
                .build(),
        );
    }
    RefOr::T(r.build())
}

/// createTask's errors.
pub struct CreateErrors;

impl IntoResponses for CreateErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        envelope_errors(&[401, 402, 422, 429, 433, 455, 500, 505])
    }
}

/// The errors of endpoints taking `taskId`: recordInfo, cancel, stream.
pub struct TaskErrors;

impl IntoResponses for TaskErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        envelope_errors(&[401, 404, 422, 429, 500, 505])
    }
}

/// list's errors.
pub struct ListErrors;

impl IntoResponses for ListErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        envelope_errors(&[401, 422, 429, 500, 505])
    }
}

/// credit's errors.
pub struct QueryErrors;

impl IntoResponses for QueryErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        envelope_errors(&[401, 429, 500, 505])
    }
}

/// download-url's errors.
pub struct DownloadUrlErrors;

impl IntoResponses for DownloadUrlErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        envelope_errors(&[401, 422, 500, 505])
    }
}

/// `/files/` errors.
pub struct FileErrors;

impl IntoResponses for FileErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        envelope_errors(&[404, 500])
    }
}

/// The uploads' errors, in the upload envelope (the HTTP status is the code).
pub struct UploadErrors;

impl IntoResponses for UploadErrors {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        // 429: over the account's upload rate or the caps on uploads in flight.
        [400, 401, 403, 413, 429, 500]
            .into_iter()
            .map(|status| {
                let description = format!(
                    "Upload envelope, `success` false, code {status}: {}.",
                    meaning(status)
                );
                (
                    status.to_string(),
                    error_response(status, description, "Failure"),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_bearer_auth() {
        let doc: serde_json::Value = serde_json::from_str(document_json()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
    }
}
