//! The contract's task record on the wire: recordInfo's `data` object and the callback
//! body built from it (API.md §3 and §4).

use remixd_domain::TaskState;
use remixd_store::TaskRecord;
use serde::Serialize;

/// The recordInfo `data` object.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordInfo {
    pub task_id: String,
    pub model: String,
    pub state: &'static str,
    pub param: String,
    pub result_json: String,
    pub fail_code: &'static str,
    pub fail_msg: String,
    pub cost_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complete_time: Option<i64>,
    pub create_time: i64,
    pub update_time: i64,
    pub credits_consumed: i64,
    pub progress: u8,
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

/// The body POSTed to a task's `callBackUrl` when it is terminal.
pub fn callback_body(task: &TaskRecord, remained_credits: i64) -> String {
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
            record: RecordInfo::from(task.clone()),
            consume_credits: consumed,
            remained_credits,
        },
    };
    serde_json::to_string(&body).expect("the callback body serialises")
}
