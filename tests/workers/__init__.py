"""The data plane (workers): Storage, blobs, retention, streaming encryption, audit."""
