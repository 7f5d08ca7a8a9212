from server.cli import app

app(prog_name="persona-server")
