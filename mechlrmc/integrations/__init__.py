"""Framework callbacks that drive `mechlrmc.Recorder`: `mechlrmc.integrations.hf.RecorderCallback`
for a `transformers.Trainer`, `mechlrmc.integrations.lightning.RecorderCallback` for a Lightning
`Trainer`. Each module imports its framework; this package imports neither."""
