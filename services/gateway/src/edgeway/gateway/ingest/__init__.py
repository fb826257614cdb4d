"""Ingestion (TrackShift's wire): image uploads and RTSP captures as jobs."""
