"""The data plane: the Storage service and its background work.

Public surface: `workers.server` (build_storage, run_background, serve_workers), the stored
object format (`workers.streaming_aead`), the blob interface (`workers.blobs.BlobStore`, with
`workers.fs_blobs.filesystem_blob_store`), and the retention sweep (`workers.retention.sweep`).
The rest (objects, jobs, runner, job handlers, broker client) serves those.
"""
