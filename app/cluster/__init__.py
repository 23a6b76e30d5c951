"""The service on a Ray cluster: Ray Serve replicas host the same FastAPI app and
resources as the single process; builds run as Ray tasks; job state lives in a
named detached actor. Imports Ray, so nothing outside this package imports it
(`pip install -e '.[ray]'`). See docs/scale-out.md.
"""

NAMESPACE = "patchcore"
APP_NAME = "patchcore"
DEPLOYMENT_NAME = "PatchCoreReplica"
JOB_BOARD_NAME = "patchcore-job-board"
FLAGGED_BOARD_NAME = "patchcore-flagged-images"
