"""Measuring on the device a model is for (docs/design.md §4 "Deployment targets", §6 "Measuring").

- `device.transport`: the one interface the search and `edge bench` measure through: the local child
  process (the default) or a device agent over HTTP;
- `device.agent`: `edge device serve`, the agent that runs on the phone, board or laptop;
- `device.client`: the host side of the agent's HTTP API;
- `device.artifacts`: the agent's content-addressed artifact cache and the header checks that stand
  between a received file and an engine;
- `device.probe`: what the device is (CPU, engines, governor, frequency, temperature).
"""
