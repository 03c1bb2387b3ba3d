//! The contract's task record on the wire: recordInfo's `data` object and the callback
//! body built from it (API.md §3 and §4).

use remixd_domain::TaskState;
use remixd_store::TaskRecord;
use serde::Serialize;

/// The recordInfo `data` object.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecordInfo {
    /// 32 lowercase hex characters (UUIDv7 digits).
    #[schema(pattern = "^[0-9a-f]{32}$")]
    pub task_id: String,
    pub model: String,
    /// `waiting` → `queuing` → `generating` → `success` | `fail`.
    #[schema(schema_with = task_state_schema)]
    pub state: &'static str,
    /// The create request as it was received, as a JSON string.
    pub param: String,
    /// A JSON string: `""` until success, then `{"resultUrls": [...], "seed": ..., "images": [...]}`.
    pub result_json: String,
    /// `""` unless failed; then `"422"` bad input, `"501"` generation failed, `"500"`
    /// internal, `"408"` deadline exceeded or `"499"` cancelled.
    #[schema(value_type = String)]
    pub fail_code: &'static str,
    /// `""` unless failed.
    pub fail_msg: String,
    /// Milliseconds of generation; `0` until terminal.
    pub cost_time: i64,
    /// Unix milliseconds; absent until terminal.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false, nullable = false)]
    pub complete_time: Option<i64>,
    /// Unix milliseconds.
    pub create_time: i64,
    /// Unix milliseconds.
    pub update_time: i64,
    /// Extension: credits reserved or consumed by the task.
    pub credits_consumed: i64,
    /// Extension: 0..100.
    #[schema(maximum = 100)]
    pub progress: u8,
}

/// `state`: one of the task states, as the contract spells them.
fn task_state_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(TaskState::ALL.iter().map(|s| s.as_str())))
        .build()
}

impl From<TaskRecord> for RecordInfo {
    fn from(t: TaskRecord) -> Self {
        let terminal = t.state.is_terminal();
        RecordInfo {
            task_id: t.id.to_string(),
            model: t.model,
            state: t.state.as_str(),
            param: t.param,
            result_json: t.result_json,
            fail_code: t.fail_code.map(|c| c.as_str()).unwrap_or(""),
            fail_msg: t.fail_msg,
            cost_time: if terminal { t.cost_time } else { 0 },
            complete_time: t.complete_time.filter(|_| terminal),
            create_time: t.create_time,
            update_time: t.update_time,
            credits_consumed: t.credits_consumed,
            progress: t.progress,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CallbackData {
    #[serde(flatten)]
    record: RecordInfo,
    consume_credits: i64,
    remained_credits: i64,
}

#[derive(Serialize)]
struct CallbackBody {
    code: u16,
    msg: &'static str,
    data: CallbackData,
}

/// The body POSTed to a task's `callBackUrl` when it is terminal, result URLs as stored.
pub async fn callback_body(task: &TaskRecord, remained_credits: i64) -> String {
    callback_body_with(task, remained_credits, &crate::links::AnswerLinks::plain()).await
}

/// The callback body with result URLs shown as `links` say (signed under
/// `storage.private_files`, presigned under `storage.public = "presigned"`).
pub async fn callback_body_with(
    task: &TaskRecord,
    remained_credits: i64,
    links: &crate::links::AnswerLinks,
) -> String {
    let success = task.state == TaskState::Success;
    let consumed = task.credits_consumed;
    let body = CallbackBody {
        code: if success { 200 } else { 501 },
        msg: if success {
            "Task completed successfully."
        } else {
            "Task failed."
        },
        data: CallbackData {
            record: links.record(task.clone()).await,
            consume_credits: consumed,
            remained_credits,
        },
    };
    serde_json::to_string(&body).expect("the callback body serialises")
}
