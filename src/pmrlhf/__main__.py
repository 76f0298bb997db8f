from pmrlhf.cli import app

app()
