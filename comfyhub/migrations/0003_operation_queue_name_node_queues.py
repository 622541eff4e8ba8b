from django.db import migrations, models


class Migration(migrations.Migration):
    """Operations routed to a node's agent name its queue, node.<name>.long for the longest node name (63)."""

    dependencies = [
        ("comfyhub", "0002_access_tokens"),
    ]

    operations = [
        migrations.AlterField(
            model_name="operation",
            name="queue_name",
            field=models.CharField(default="default", max_length=100),
        ),
    ]
