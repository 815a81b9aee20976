"""`flux2-lora ui`: a Gradio app over the same functions and commands as the CLI.

- `paths.Roots`: the folders the app may read and write; every path a user types goes through it.
- `jobs.JobManager`: training, sweeps and evaluations run as `flux2-lora ...` child processes, recorded on disk so a
  browser reload (or a restarted app) finds them again; one job per output folder.
- `views`: what a run, a sweep or a dataset looks like right now, read from its folder (no Gradio).
- `app`: the four tabs (Dataset, Training, Evaluation, Optimization) and `flux2-lora ui` itself.
"""
