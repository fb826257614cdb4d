"""What Edgeway services share. Importable only: no entry points live here."""
