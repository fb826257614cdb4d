"""Vehicle telemetry: the protobuf wire format (`telemetry.proto`, `wire`) and the predictive
compression that the logger and the telemetry service share (`predictor`)."""
