-- Run by the postgres image on its first start only (an empty postgres-data volume), as
-- POSTGRES_USER, after it has created POSTGRES_DB (occupancy). Each service owns its database:
-- this adds the telemetry, ingestion and tracker services'. Mounted by compose.yaml into
-- /docker-entrypoint-initdb.d.
CREATE DATABASE telemetry;
CREATE DATABASE ingestion;
CREATE DATABASE tracker;
