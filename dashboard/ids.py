"""Component ids, one place, prefixed by page."""

CASELOAD_GRID = "caseload-grid"
CASELOAD_TEAM = "caseload-team"
CASELOAD_THERAPIST = "caseload-therapist"
CASELOAD_COUNT = "caseload-count"

CLIENT_EPISODE = "client-episode"
CLIENT_FLAGS = "client-flags"
CLIENT_REVIEW_DECISION = "client-review-decision"
CLIENT_REVIEW_NOTE = "client-review-note"
CLIENT_REVIEW_NEXT = "client-review-next"
CLIENT_REVIEW_RISK = "client-review-risk"
CLIENT_REVIEW_SUBMIT = "client-review-submit"
CLIENT_REVIEW_RESULT = "client-review-result"
CLIENT_REVIEWS = "client-reviews"

SERVICE_RATE = "service-rate"
SERVICE_FUNNEL = "service-funnel"

QUALITY_REASON = "quality-reason"
QUALITY_RECORDS = "quality-records"
