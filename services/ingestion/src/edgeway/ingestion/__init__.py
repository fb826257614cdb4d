"""Edgeway ingestion: image uploads and RTSP captures into object storage."""
