"""The public functional API: one dispatch point per op (validate -> pick backend -> call)."""
